"""`compare`: the report of models a user made in their own loop, each measured where it
runs (a module in torch, an ONNX file in ONNX Runtime and every other runtime), with the
same measuring code and report files as a pipeline run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..data import as_data_spec, grouped
from ..errors import DataError, UserError
from ..inputs import describe
from ..models.layers import unwrap_parallel
from ..models.model_io import ModelIO
from ..report.bench import params_and_precision
from ..report.report import Report
from ..row import Row
from ..runtime.measure import (
    default_threads,
    environment,
    measure_onnx,
    measure_torch,
    onnx_predictor,
    torch_predictor,
)
from ..runtime.parity import OutputRecorder, compare_outputs, compare_recorded
from ..runtime.runtimes import check_runtimes
from ..stage import resolve_data_io


def compare(
    entries: Mapping[str, nn.Module | str | Path],
    eval_data: Any,
    *,
    output_dir: str | Path | None = None,
    io: ModelIO | None = None,
    eval_fn: Any = None,
    threads: int | None = None,
    runtimes: Sequence[str] | None = None,
    throughput_batch: int = 32,
    progress: bool = False,
) -> Report:
    """A `Report` with one row per entry, named by its key, each measured in the runtime it
    belongs to: a module in torch, an ONNX file in ONNX Runtime and in every other runtime
    of ``runtimes`` (default: every one installed). Accuracy, latency, throughput, size,
    params (and MACs for modules) come from the pipeline's own measuring code, on the same
    ``eval_data``, threads and batch sizes.

    The summary and diagnosis compare the last entry with the one named ``baseline``
    (name your original model so); ``parity`` compares the last ONNX file's outputs with
    the first module's over ``eval_data``. With ``output_dir``, report.json, report.md and
    report.html are written there.

    Example:
        >>> report = cz.compare({"baseline": model, "pruned": pruned, "int8": path},
        ...                     eval_data=val_loader, output_dir="out")   # doctest: +SKIP

    Raises:
        UserError: no entries, a key that is not text, an entry that is neither a module
            nor an existing ``.onnx`` file.
        DataError: ``eval_data`` that the models cannot run on.
    """
    if not isinstance(entries, Mapping) or not entries:
        msg = "compare: give a mapping of names to models or ONNX files, e.g. {'baseline': model}"
        raise UserError(msg)
    for key, value in entries.items():
        if not isinstance(key, str) or not key:
            raise UserError(f"compare: entry names must be non-empty text (got: {key!r})")
        if not isinstance(value, nn.Module | str | Path):
            msg = (
                f"compare: entry {key!r} must be a torch.nn.Module or an ONNX file path "
                f"(got: {type(value).__name__})"
            )
            raise UserError(msg)
        if not isinstance(value, nn.Module) and (
            Path(value).suffix != ".onnx" or not Path(value).is_file()
        ):
            raise UserError(f"compare: entry {key!r}: no ONNX file at {str(value)!r}")
    data = as_data_spec(eval_data, "eval_data")
    threads = threads or default_threads()
    chosen = check_runtimes(runtimes)
    example = data.example_input()
    modules = {k: unwrap_parallel(v) for k, v in entries.items() if isinstance(v, nn.Module)}
    first = next(iter(modules.values()), None)
    if first is not None:
        _, io = resolve_data_io(io, first.cpu().eval(), data, "eval_data")
    io = io or ModelIO()
    common = {
        "data": data if eval_fn is not None else grouped(data, throughput_batch),
        "eval_fn": eval_fn or io.eval_fn(),
        "threads": threads,
        "throughput_batches": (throughput_batch,),
    }
    rows: list[Row] = []
    # the parity's two evaluations (the first module, the last file) keep their outputs
    files = [k for k, v in entries.items() if not isinstance(v, nn.Module)]
    recorded = {}
    if modules and files:
        recorded = {next(iter(modules)): OutputRecorder(), files[-1]: OutputRecorder()}
    for key, value in entries.items():
        if progress:
            print(f"[compressor] compare: measuring {key}", flush=True)
        if isinstance(value, nn.Module):
            model, _ = resolve_data_io(io, modules[key].cpu().eval(), data, "eval_data")
            rows.append(
                measure_torch(
                    model, name=key, example_input=example, record=recorded.get(key), **common
                )
            )
            continue
        path = Path(value)
        params, precision = params_and_precision(path)
        for runtime in chosen:
            record = recorded.get(key) if runtime == "onnxruntime" else None
            rows.append(
                measure_onnx(
                    path,
                    name=key,
                    precision=precision,
                    params=params,
                    macs=None,
                    details={"file": path.name},
                    runtime=runtime,
                    record=record,
                    **common,
                )
            )
    report = Report(
        rows=_runtime_last(rows),
        environment=environment(threads),
        parity=_parity(entries, modules, io, data, threads, recorded),
        model_io={
            **io.to_dict(custom_metric=eval_fn is not None),
            "inputs": describe(example),
        },
    )
    if output_dir is not None:
        out = Path(output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"output folder {str(out)!r} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
        report.save(out)
    return report


def _runtime_last(rows: list[Row]) -> list[Row]:
    """The rows as measured, but the last entry's ONNX Runtime row last (the report's final
    row), after its rows in the other runtimes, as a pipeline orders them."""
    if not rows or rows[-1].runtime == "torch":
        return rows
    last = rows[-1].name
    tail = [r for r in rows if r.name == last]
    ort = [r for r in tail if r.runtime == "onnxruntime"]
    others = [r for r in tail if r.runtime != "onnxruntime"]
    return [r for r in rows if r.name != last] + others + ort


def _parity(
    entries: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    io: ModelIO,
    data: Any,
    threads: int,
    recorded: Mapping[str, OutputRecorder],
) -> dict[str, Any] | None:
    """The last ONNX file's outputs against the first module's, over the eval data (from
    their evaluations' recorded outputs when those cover it)."""
    files = [k for k, v in entries.items() if not isinstance(v, nn.Module)]
    if not files or not modules:
        return None
    reference_key = next(iter(modules))
    if reference_key in recorded and files[-1] in recorded:
        try:
            found = compare_recorded(recorded[reference_key], recorded[files[-1]], io.labels)
        except ValueError as exc:
            raise DataError(f"compare: {files[-1]!r} and {reference_key!r}: {exc}") from exc
        if found is not None:
            return {"reference": reference_key, "artifact": files[-1], **found}
    reference, _ = resolve_data_io(io, modules[reference_key], data, "eval_data")
    candidate = onnx_predictor(entries[files[-1]], threads)
    try:
        found = compare_outputs(torch_predictor(reference), candidate, data, labels=io.labels)
    except ValueError as exc:
        raise DataError(f"compare: {files[-1]!r} and {reference_key!r}: {exc}") from exc
    return {"reference": reference_key, "artifact": files[-1], **found}
