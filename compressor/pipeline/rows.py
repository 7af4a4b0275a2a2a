"""The rows a run measures: the baseline in torch and every runtime, each stage's result in
the runtime it names, and the final file's parity with the baseline.

Accuracy is computed once per distinct model. The FP32 export model.onnx is evaluated in ONNX
Runtime; the torch model it was exported from and the same file in another runtime take that
accuracy when they give the same answers on a sample of the eval data (every prediction
agrees, outputs within the export check's tolerance; the parity is in the row's
``details.accuracy_from``), and are evaluated in full when they do not, or when the run asks
for ``full_evaluation``. Every other model and every INT8 file is evaluated in each runtime
it is reported in. The final file's parity with model.onnx reuses both files' recorded
outputs instead of running them again.
"""

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
    count_params_macs,
    measure_onnx,
    measure_torch,
    onnx_predictor,
    sample_batch,
)
from ..runtime.parity import OutputRecorder, compare_outputs, compare_recorded, sample_parity
from ..stage import RunContext, Stage, State

PARITY_SAMPLES = 64
"""Eval inputs the export check and the other runtimes' parity run on."""


def in_other_runtimes(path: Path, row: Row, ctx: RunContext) -> list[Row]:
    """The ONNX file ``row`` measured in every runtime of the run besides ONNX Runtime.

    ``details.parity`` compares the file's outputs there with model.onnx's in ONNX Runtime
    on `PARITY_SAMPLES` eval inputs. An FP32 file that gives the same answers takes ``row``'s
    accuracy (unless ``ctx.full_evaluation``); any other is evaluated in that runtime.
    """
    others = [r for r in ctx.runtimes if r != "onnxruntime"]
    if not others:
        return []
    reference = onnx_predictor(ctx.output_dir / "model.onnx", ctx.threads)
    sample = sample_batch(ctx.eval_data, PARITY_SAMPLES)
    rows = []
    for runtime in others:
        ctx.log(f"measuring {path.name} in {runtime}")
        candidate = onnx_predictor(path, ctx.threads, runtime)
        parity = sample_parity(reference, candidate, sample, ctx.io.labels)
        known, details = None, {"file": path.name, "parity": parity}
        if _may_share(row, parity, ctx):
            known = row.accuracy
            details["accuracy_from"] = {"runtime": row.runtime, "parity": parity}
        rows.append(
            measure_onnx(
                path,
                name=row.name,
                precision=row.precision,
                params=row.params,
                macs=row.macs,
                details=details,
                runtime=runtime,
                known_accuracy=known,
                **ctx.measure_settings(),
            )
        )
    return rows


def final_parity(state: State, ctx: RunContext) -> dict[str, Any] | None:
    """The final ONNX file's outputs against the FP32 baseline file's over the eval data
    (from both files' recorded evaluations when they cover the same inputs)."""
    baseline = ctx.output_dir / "model.onnx"
    if state.onnx_path is None or state.onnx_path == baseline:
        return None
    reference, candidate = ctx.recorded.get(baseline), ctx.recorded.get(state.onnx_path)
    try:
        parity = None
        if reference is not None and candidate is not None:
            parity = compare_recorded(reference, candidate, ctx.io.labels)
        if parity is None:
            ctx.log(f"comparing {state.onnx_path.name} with model.onnx over the eval data")
            parity = compare_outputs(
                onnx_predictor(baseline, ctx.threads),
                onnx_predictor(state.onnx_path, ctx.threads),
                ctx.eval_data,
                labels=ctx.io.labels,
            )
    except ValueError as exc:  # a stage changed the output shape; nothing to compare
        ctx.log(f"parity not measured: {exc}")
        return None
    return {"reference": baseline.name, "artifact": state.onnx_path.name, **parity}


def start_state(model: nn.Module, ctx: RunContext) -> State:
    """The state a run starts from: the model's copy and its frozen teacher, model.onnx
    exported, and the baseline measured in ONNX Runtime, torch and every other runtime."""
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
    ctx.log("baseline: exporting model.onnx and measuring it in ONNX Runtime and torch")
    start = time.perf_counter()
    path = ctx.output_dir / "model.onnx"
    parity = export_onnx(
        teacher,
        example,
        path,
        check_inputs=sample_batch(ctx.eval_data, PARITY_SAMPLES),
        threads=ctx.threads,
        labels=ctx.io.labels,
    ).to_dict()
    export_s = time.perf_counter() - start
    common = ctx.measure_settings()
    params, macs = count_params_macs(teacher, example)
    record = ctx.recorded[path] = OutputRecorder()
    onnx_row = measure_onnx(
        path,
        name="baseline",
        precision="fp32",
        params=params,
        macs=macs,
        details={"file": "model.onnx", "parity": parity},
        record=record,
        **common,
    )
    onnx_row = dataclasses.replace(
        onnx_row, seconds={"stage": round(export_s, 2), **onnx_row.seconds}
    )
    # the export check compared torch and ONNX Runtime on the sample and passed
    parity_found = {**parity, "same_answers": parity["top1_agreement"] == 1.0}
    shared = _may_share(onnx_row, parity_found, ctx)
    torch_row = measure_torch(
        teacher,
        name="baseline",
        example_input=example,
        known_accuracy=onnx_row.accuracy if shared else None,
        details={"accuracy_from": {"runtime": "onnxruntime", "parity": parity}} if shared else {},
        **common,
    )
    others = in_other_runtimes(path, onnx_row, ctx)
    return State(
        model=student,
        teacher=teacher,
        example_input=example,
        rows=(torch_row, onnx_row, *others),
    )


def phase_seconds(
    rows: tuple[Row, ...] | list[Row],
    phases: dict[str, str],
    *,
    total: float,
    **more: float,
) -> dict[str, float]:
    """The run's wall time by phase: each stage's time under its phase (``phases`` maps a
    step name to it), the baseline's export, every row's measuring, and ``more`` (e.g. the
    final parity, the load test); ``other`` is what the run spent outside them."""
    found: dict[str, float] = {}

    def add(phase: str, seconds: float) -> None:
        found[phase] = found.get(phase, 0.0) + seconds

    for row in rows:
        spent = row.seconds.get("stage", 0.0)
        if row.name == "baseline":
            add("export", spent)
        elif row.name in phases:
            add(phases[row.name], spent)
        add("measuring", row.seconds.get("measure", 0.0))
    for phase, seconds in more.items():
        add(phase, seconds)
    found = {k: round(v, 1) for k, v in found.items()}
    found["other"] = round(max(0.0, total - sum(found.values())), 1)
    found["total"] = round(total, 1)
    return found


def _may_share(row: Row, parity: dict[str, Any], ctx: RunContext) -> bool:
    """Whether a model that gave ``parity`` against ``row``'s takes its accuracy: an FP32
    row with an accuracy, the same answers on the sample, no full evaluation asked for."""
    return (
        not ctx.full_evaluation
        and row.precision == "fp32"
        and row.accuracy is not None
        and bool(parity.get("same_answers"))
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
        baseline = ctx.output_dir / "model.onnx"
        for kept in [p for p in ctx.recorded if p != baseline]:  # the latest file's only
            del ctx.recorded[kept]
        record = ctx.recorded[state.onnx_path] = OutputRecorder()
        return measure_onnx(
            state.onnx_path,
            name=step,
            precision=stage.precision,
            params=params,
            macs=macs,
            details={"file": state.onnx_path.name, **state.details},
            record=record,
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
