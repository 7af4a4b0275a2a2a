"""The rows a run measures: the baseline in torch and every runtime, each stage's result in
the runtime it names, and the final file's parity with the baseline."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, ModelError
from ..inputs import call, shape_text
from ..models.layers import call_naming_layer
from ..models.model_io import check_targets
from ..report.report import Row
from ..runtime.export import export_onnx
from ..runtime.measure import (
    compare_outputs,
    count_params_macs,
    measure_onnx,
    measure_torch,
    onnx_predictor,
    sample_batch,
)
from ..stage import RunContext, Stage, State


def in_other_runtimes(path: Path, row: Row, ctx: RunContext) -> list[Row]:
    """The ONNX file ``row`` measured in every runtime of the run besides ONNX Runtime.

    Accuracy comes from running the file in that runtime; ``details.parity`` compares its
    outputs with model.onnx's in ONNX Runtime over the eval data.
    """
    others = [r for r in ctx.runtimes if r != "onnxruntime"]
    if not others:
        return []
    reference = onnx_predictor(ctx.output_dir / "model.onnx", ctx.threads)
    rows = []
    for runtime in others:
        ctx.log(f"measuring {path.name} in {runtime}")
        candidate = onnx_predictor(path, ctx.threads, runtime)
        parity = compare_outputs(reference, candidate, ctx.eval_data, labels=ctx.io.labels)
        rows.append(
            measure_onnx(
                path,
                name=row.name,
                precision=row.precision,
                params=row.params,
                macs=row.macs,
                details={"file": path.name, "parity": parity},
                runtime=runtime,
                **ctx.measure_settings(),
            )
        )
    return rows


def final_parity(state: State, ctx: RunContext) -> dict[str, Any] | None:
    """The final ONNX file's outputs against the FP32 baseline file's over the eval data."""
    baseline = ctx.output_dir / "model.onnx"
    if state.onnx_path is None or state.onnx_path == baseline:
        return None
    ctx.log(f"comparing {state.onnx_path.name} with model.onnx over the eval data")
    reference = onnx_predictor(baseline, ctx.threads)
    candidate = onnx_predictor(state.onnx_path, ctx.threads)
    try:
        parity = compare_outputs(reference, candidate, ctx.eval_data, labels=ctx.io.labels)
    except ValueError as exc:  # a stage changed the output shape; nothing to compare
        ctx.log(f"parity not measured: {exc}")
        return None
    return {"reference": baseline.name, "artifact": state.onnx_path.name, **parity}


def start_state(model: nn.Module, ctx: RunContext) -> State:
    """The state a run starts from: the model's copy and its frozen teacher, model.onnx
    exported, and the baseline measured in torch and every runtime."""
    example = ctx.train_data.example_input()
    student = copy.deepcopy(model).cpu().eval()
    try:
        with torch.no_grad():
            out = call_naming_layer(
                student, lambda: call(student, example), "a forward pass on the data"
            )
    except ModelError:
        raise
    except Exception as exc:
        msg = f"the model cannot run on the data (input shape {shape_text(example)}): {exc}"
        raise ModelError(msg) from exc
    _check_outputs(out, ctx)
    teacher = copy.deepcopy(student).requires_grad_(False)
    ctx.log("baseline: exporting model.onnx and measuring it in torch and ONNX Runtime")
    start = time.perf_counter()
    parity = export_onnx(
        teacher,
        example,
        ctx.output_dir / "model.onnx",
        check_inputs=sample_batch(ctx.eval_data, 64),
        threads=ctx.threads,
        labels=ctx.io.labels,
    )
    export_s = time.perf_counter() - start
    common = ctx.measure_settings()
    torch_row = measure_torch(teacher, name="baseline", example_input=example, **common)
    onnx_row = measure_onnx(
        ctx.output_dir / "model.onnx",
        name="baseline",
        precision="fp32",
        params=torch_row.params,
        macs=torch_row.macs,
        details={"file": "model.onnx", "parity": parity.to_dict()},
        **common,
    )
    onnx_row = dataclasses.replace(
        onnx_row, seconds={"stage": round(export_s, 2), **onnx_row.seconds}
    )
    others = in_other_runtimes(ctx.output_dir / "model.onnx", onnx_row, ctx)
    return State(
        model=student,
        teacher=teacher,
        example_input=example,
        rows=(torch_row, onnx_row, *others),
    )


def measure_step(stage: Stage, step: str, state: State, ctx: RunContext) -> Row:
    """A finished stage's row, measured in the runtime the stage names."""
    ctx.log(f"{step}: measuring")
    common = ctx.measure_settings()
    if stage.runtime == "onnxruntime":
        if state.onnx_path is None:
            msg = f"stage {step!r} runs in onnxruntime but produced no ONNX file"
            raise RuntimeError(msg)
        params, macs = count_params_macs(state.model, state.example_input)
        return measure_onnx(
            state.onnx_path,
            name=step,
            precision=stage.precision,
            params=params,
            macs=macs,
            details={"file": state.onnx_path.name, **state.details},
            **common,
        )
    return measure_torch(
        state.model,
        name=step,
        example_input=state.example_input,
        details=state.details,
        **common,
    )


def _check_outputs(out: Any, ctx: RunContext) -> None:
    """The model gives one tensor; both data sets have batches whose class targets fit it."""
    if not isinstance(out, torch.Tensor):
        msg = (
            f"the model's forward returns a {type(out).__name__}; compressor compares, "
            "distils and exports one output tensor: name it with cz.ModelIO(output=...)"
        )
        raise ModelError(msg)
    for what, data in (("train_data", ctx.train_data), ("eval_data", ctx.eval_data)):
        batch = next(data.iter_batches(1), None)
        if batch is None:
            raise DataError(f"{what} is empty: its first pass yielded no batch")
        problem = check_targets(out, data.target_fn(batch), ctx.io, what)
        if problem:
            raise DataError(problem)
