"""Write your own stage: a plain fine-tuning stage with label smoothing, usable in recipes.

A stage is a frozen dataclass whose fields are its options. It checks them in
``__post_init__`` (so a bad value fails before any training) and implements
``apply(state, ctx) -> state``: it gets the current model in ``state.model`` and the run's
data, loss, device and threads in ``ctx``, and returns the next state. ``register_stage``
makes it a recipe key. The pipeline measures its result and gives it a report row, like the
built-in stages.

    python examples/custom_stage.py            # the embedded demo data, about a minute
    python examples/custom_stage.py --quick    # a smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import compressor as cz
from compressor.sources.demo import DemoResNet, demo_data
from compressor.stage import check_float, check_int
from compressor.training.loop import fit_baseline, logits_of, train

HERE = Path(__file__).parent


@cz.register_stage("fine_tune")
@dataclass(frozen=True)
class FineTune(cz.Stage):
    """Fine-tune the current model on the labels, with label smoothing.

    Args:
        epochs: passes over the training data.
        lr: initial learning rate (SGD, cosine decay: compressor's train loop).
        label_smoothing: share of the target mass spread over the other classes, in [0, 1).
    """

    epochs: int = 1
    lr: float = 0.01
    label_smoothing: float = 0.1

    name = "fine_tune"
    runtime = "torch"  # measured in torch; a stage writing state.onnx_path says "onnxruntime"
    precision = "fp32"

    def __post_init__(self) -> None:
        check_int(self.name, "epochs", self.epochs, minimum=1)
        check_float(self.name, "lr", self.lr, low=0.0, low_open=True)
        check_float(
            self.name, "label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True
        )

    def apply(self, state: cz.State, ctx: cz.RunContext) -> cz.State:
        """Fine-tune a copy of ``state.model``; the copy becomes the next state's model."""
        model = copy.deepcopy(state.model)  # never change the state you were given

        def compute_loss(m: torch.nn.Module, inputs: torch.Tensor, targets: Any) -> Any:
            logits = logits_of(m(inputs))
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            return loss, logits  # with the logits the progress bar shows training accuracy

        history = train(
            model, ctx, epochs=self.epochs, lr=self.lr, compute_loss=compute_loss, desc=ctx.step
        )
        return state.replace(model=model, details={"train_loss": history})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/custom_stage")
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch")
    args = parser.parse_args()
    limit = 10 if args.quick else None

    train_loader, val_loader = demo_data(batch_size=64)
    torch.manual_seed(0)
    model = DemoResNet(width=32)
    fit_baseline(model, train_loader, epochs=1, limit_train_batches=limit, progress=False)

    # In Python, the stage is used like any other ...
    pipeline = cz.Pipeline([cz.StructuredPruning(ratio=0.5, round_to=8), FineTune(epochs=1)])
    print(pipeline.to_recipe())
    # ... and once registered, by name in a recipe file:
    pipeline = cz.Pipeline.from_recipe(HERE / "recipes" / "prune_fine_tune.yaml")
    result = pipeline.run(
        model,
        train_loader,
        val_loader,
        output_dir=args.output,
        limit_train_batches=limit,
        progress=not args.quick,
    )
    print(result.report)


if __name__ == "__main__":
    main()
