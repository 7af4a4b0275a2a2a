"""The baseline step before the stages: a model that arrives untrained (the demo, a
torchvision or Hugging Face architecture without weights) is trained first, inside the run's
output folder, so an interrupted run resumes from the trained baseline; under torchrun every
rank trains it together and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models.checkpoints import load_checkpoint, save_checkpoint
from ..training import distributed
from ..training.loop import fit_baseline
from .output_folder import run_folder
from .pipeline import Pipeline, PipelineResult

BASELINE_CHECKPOINT = Path("checkpoints") / "00_baseline.pt"


def run_with_baseline(
    pipeline: Pipeline,
    model: nn.Module,
    train_data: Any,
    eval_data: Any,
    *,
    output_dir: Path,
    baseline_epochs: int,
    baseline_lr: float,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    describe: str,
    resume: bool = False,
    progress: bool = True,
    **run_options: Any,
) -> PipelineResult:
    """Train ``model`` in place for ``baseline_epochs`` (none: as given), then run
    ``pipeline`` on it; both in one locked output folder.

    With ``resume``, a baseline the interrupted run trained is loaded, not trained again.
    ``describe`` names the model and data in the progress line; ``run_options`` go to
    `Pipeline.run` (device, seed, threads, training options, runtimes, io, ...).
    """
    parallel = distributed.active()
    leader = not distributed.is_follower()
    options = {k: run_options[k] for k in _TRAINING if k in run_options}
    folder_cm = run_folder(output_dir, resume=resume) if leader else contextlib.nullcontext()
    with folder_cm as folder:
        trained = folder.staging / BASELINE_CHECKPOINT if leader else None
        if leader and baseline_epochs and resume and trained.is_file():
            # the baseline trained by the interrupted run (CUDA training is not bit-exact)
            try:
                model, _ = load_checkpoint(trained, model)
            except UserError as exc:
                print(f"[compressor] resume: {exc}; training it again", file=sys.stderr)
                trained.unlink()
        train = bool(baseline_epochs) and not (leader and resume and trained.is_file())
        if parallel:  # rank 0 decides: every rank trains the baseline, or none does
            train = distributed.share(train)
        if train:
            if progress:
                print(
                    f"[compressor] baseline: training {describe} for {baseline_epochs} epoch(s)",
                    file=sys.stderr,
                )
            fit_baseline(
                model,
                train_data,
                epochs=baseline_epochs,
                lr=baseline_lr,
                progress=progress,
                loss_fn=loss_fn,
                **options,
            )
            if leader:
                extra = {"epochs": baseline_epochs}
                save_checkpoint(trained, model, step="baseline", stage={}, extra=extra)
        return pipeline.run(
            model,
            train_data,
            eval_data,
            output_dir=output_dir,
            resume=resume,
            progress=progress,
            **run_options,
        )


_TRAINING = (
    "device",
    "seed",
    "limit_train_batches",
    "mixed_precision",
    "accumulate_grad_batches",
)
"""The `Pipeline.run` options the baseline trains with too."""
