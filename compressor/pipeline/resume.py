"""Resuming a run: which stages an interrupted run finished (their checkpoints, options,
settings and model unchanged), and the state after the last one."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from ..models.checkpoints import (
    load_checkpoint,
    read_checkpoint,
)
from ..report.report import Row
from ..stage import RunContext, Stage, State


def checkpoint_path(ctx: RunContext, index: int, step: str) -> Path:
    return ctx.output_dir / "checkpoints" / f"{index + 1:02d}_{step}.pt"


def resume_settings(ctx: RunContext) -> dict[str, Any]:
    """The run settings a resumed run must share with the one it continues."""
    return {
        "seed": ctx.seed,
        "threads": ctx.threads,
        "limit_train_batches": ctx.limit_train_batches,
        "throughput_batches": list(ctx.throughput_batches),
        "runtimes": list(ctx.runtimes),
        # only when set, so that checkpoints from before these options still resume
        **({"mixed_precision": ctx.mixed_precision} if ctx.mixed_precision else {}),
        **(
            {"accumulate_grad_batches": ctx.accumulate_grad_batches}
            if ctx.accumulate_grad_batches != 1
            else {}
        ),
    }


def _differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(set(before) | set(now))
    return ", ".join(
        f"{k} was {before.get(k)!r}, now {now.get(k)!r}"
        for k in keys
        if before.get(k) != now.get(k)
    )


def finished_stages(
    stages: Sequence[Stage],
    steps: Sequence[str],
    model: nn.Module,
    ctx: RunContext,
    fingerprint: str,
    settings: dict[str, Any],
) -> tuple[int, State | None]:
    """How many stages an earlier run finished here, and the state after the last one.

    Stages count as finished while their checkpoints exist, name the same step with the
    same options, and the files they refer to are still there.
    """
    done, payload, path = 0, None, None
    for index, (stage, step) in enumerate(zip(stages, steps, strict=True)):
        candidate = checkpoint_path(ctx, index, step)
        if not candidate.is_file():
            break
        try:
            found = read_checkpoint(candidate)
        except UserError as exc:  # truncated or not a checkpoint: that stage runs again
            ctx.log(f"resume: {exc}; that stage runs again")
            break
        extra = found.get("extra", {})
        onnx = extra.get("onnx_path")
        if found.get("stage") != {stage.name: stage.to_dict()} or (
            onnx and not (ctx.output_dir / onnx).is_file()
        ):
            break
        if extra.get("settings") != settings:
            msg = (
                f"cannot resume from {candidate}: it was made with other settings "
                f"({_differences(extra.get('settings') or {}, settings)}); run without "
                "resume, or with those settings"
            )
            raise UserError(msg)
        if extra.get("model_fingerprint") != fingerprint:
            msg = (
                f"cannot resume from {candidate}: it was made from another model (or other "
                "weights); run without resume, or with another output folder"
            )
            raise UserError(msg)
        done, payload, path = index + 1, found, candidate
    if payload is None or path is None or not (ctx.output_dir / "model.onnx").is_file():
        ctx.log("resume: no finished stage of this pipeline found; starting from the start")
        return 0, None
    ctx.log(f"resume: {done} of {len(stages)} stage(s) finished; loading {path.name}")
    student, _ = load_checkpoint(path, copy.deepcopy(model).cpu().eval())
    teacher = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    onnx = payload["extra"]["onnx_path"]
    return done, State(
        model=student.eval(),
        teacher=teacher,
        example_input=ctx.train_data.example_input(),
        onnx_path=ctx.output_dir / onnx if onnx else None,
        rows=tuple(Row.from_dict(r) for r in payload["extra"]["rows"]),
    )
