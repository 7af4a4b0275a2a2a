"""How the ranks of a data-parallel pipeline run work together (see
`compressor.training.distributed`).

Rank 0 runs `Pipeline.run` as in one process. Before each training stage it sends the
other ranks the state (model, teacher, example input; weights and layer widths only, no
pickled module) and all ranks train together; after the last stage it sends the result.
The other ranks run `follow`: they train when told and return rank 0's result.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.checkpoints import model_fingerprint, model_payload, rebuild
from ..report.report import Report
from ..stage import RunContext, Stage, State
from ..training import distributed


def send_state(index: int, state: State) -> None:
    """Rank 0: the other ranks are to run training stage ``index`` on ``state``."""
    distributed.share(
        {
            "kind": "train",
            "index": index,
            "model": model_payload(state.model),
            "teacher": model_payload(state.teacher),
            "example_input": state.example_input,
        }
    )


def send_result(model: nn.Module, onnx_path: Path | None, report: Report, output: Path) -> None:
    """Rank 0: the run is done; every rank returns this result."""
    distributed.share(
        {
            "kind": "done",
            "model": model_payload(model),
            "onnx_path": str(onnx_path) if onnx_path else None,
            "report": json.loads(report.to_json()),  # plain data only
            "output_dir": str(output),
        }
    )


def in_sync(model: nn.Module) -> bool:
    """Every rank's ``model`` has the same weights and buffers as rank 0's (all ranks call)."""
    prints: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(prints, model_fingerprint(model))
    return all(p == prints[0] for p in prints)


def follow(
    stages: Sequence[Stage], step_names: Sequence[str], model: nn.Module, ctx: RunContext
) -> tuple[nn.Module, Path | None, Report, Path]:
    """A rank other than 0: train whenever rank 0 says; then rank 0's result.

    Returns the compressed model, the final ONNX path, the report and the output folder
    (paths on rank 0's machine).

    Raises:
        DistributedError: rank 0 failed (its message).
    """
    template = copy.deepcopy(model).cpu().eval()
    while True:
        message = distributed.share()
        if message["kind"] == "error":
            raise distributed.DistributedError(message["message"])
        if message["kind"] == "done":
            onnx = message["onnx_path"]
            return (
                rebuild(message["model"], template).eval(),
                Path(onnx) if onnx else None,
                Report.from_dict(message["report"]),
                Path(message["output_dir"]),
            )
        index = message["index"]
        state = State(
            model=rebuild(message["model"], template).eval(),
            teacher=rebuild(message["teacher"], template).eval().requires_grad_(False),
            example_input=message["example_input"],
        )
        step_ctx = dataclasses.replace(
            ctx, step=step_names[index], upcoming=tuple(stages[index + 1 :])
        )
        torch.manual_seed(ctx.seed)  # as rank 0 does before every stage
        ctx.train_data.reseed(ctx.seed)
        trained = stages[index].apply(state, step_ctx)
        in_sync(trained.model)
