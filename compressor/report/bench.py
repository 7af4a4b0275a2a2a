"""Measure any ONNX file with the report's own code (`compressor bench`).

Latency does not depend on the input values, so the files run on seeded random inputs
of the shape the model declares (float inputs: normal values; integer inputs such as token
ids and attention masks: zeros, which every vocabulary holds); accuracy is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from ..data import DataSpec
from ..errors import UserError, first_line
from ..row import Row
from ..runtime.measure import default_threads, environment, measure_onnx, ort_session
from ..runtime.runtimes import check_runtimes
from .report import Report

_INT8_OPS = (
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
)
_INTEGER_TYPES = {
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def bench(
    paths: Sequence[str | Path],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    input_shape: Sequence[int] | None = None,
    runtimes: Sequence[str] | None = None,
) -> Report:
    """A report with one row per ONNX file and runtime, measured side by side in one process.

    Args:
        paths: ONNX files (one input, or several named ones such as token ids and a mask).
        batch_sizes: latency (p50/p95) is measured at the first, throughput at the others
            (at the first too when it is the only one).
        threads: the runtimes' intra-op threads (default: all cores).
        input_shape: the input's shape without the batch axis, for models that leave it
            dynamic (e.g. ``[3, 224, 224]``, or ``[128]`` for a text model's tokens; it
            applies to every input with dynamic sizes).
        runtimes: from ``("onnxruntime", "openvino")`` (default: every one installed);
            ONNX Runtime always measures.
    """
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        msg = f"batch sizes must be >= 1 (got: {list(batch_sizes)})"
        raise UserError(msg)
    threads = threads or default_threads()
    chosen = check_runtimes(runtimes)
    rows: list[Row] = []
    for path in paths:
        path = Path(path)
        inputs, shape = _inputs(path, input_shape, threads, max(sizes))
        data = DataSpec([(inputs, None)])
        params, precision = params_and_precision(path)
        for runtime in chosen:
            row = measure_onnx(
                path,
                name=path.stem if path.suffix == ".onnx" else path.name,
                precision=precision,
                data=data,
                eval_fn=None,
                params=params,
                macs=None,
                threads=threads,
                throughput_batches=sizes[1:] or sizes,
                latency_batch=sizes[0],
                details={"file": str(path), "input_shape": list(shape)},
                runtime=runtime,
            )
            rows.append(row)
    return Report(rows=rows, environment=environment(threads))


def _inputs(
    path: Path, given: Sequence[int] | None, threads: int, rows: int
) -> tuple[Any, list[int]]:
    """Seeded inputs for ``rows`` samples (a tensor for one float input, else a dict by
    name) and the shape without the batch axis they have."""
    if not path.is_file():
        msg = f"ONNX file {str(path)!r} does not exist"
        raise UserError(msg)
    try:
        session = ort_session(path, threads)
    except Exception as exc:
        msg = f"ONNX Runtime cannot load {str(path)!r}: {first_line(exc)}"
        raise UserError(msg) from exc
    declared = session.get_inputs()
    bad = [f"{i.name}: {i.type}" for i in declared if i.type not in {*_INTEGER_TYPES, *_FLOATS}]
    if bad:
        msg = f"bench feeds float and integer inputs; {path.name} has: {', '.join(bad)}"
        raise UserError(msg)
    generator = torch.Generator().manual_seed(0)
    tensors, shapes = {}, []
    for info in declared:
        shape = _shape(path, info, given)
        shapes.append(shape)
        if info.type in _FLOATS:
            tensors[info.name] = torch.randn((rows, *shape), generator=generator)
        else:
            tensors[info.name] = torch.zeros((rows, *shape), dtype=_INTEGER_TYPES[info.type])
    if len(tensors) == 1 and declared[0].type in _FLOATS:
        return tensors[declared[0].name], shapes[0]
    return tensors, shapes[0]


_FLOATS = {"tensor(float)", "tensor(float16)", "tensor(double)"}


def _shape(path: Path, info: Any, given: Sequence[int] | None) -> list[int]:
    declared = info.shape[1:]
    if given is not None:
        if len(given) != len(declared) or any(
            isinstance(d, int) and d != g for d, g in zip(declared, given, strict=False)
        ):
            msg = (
                f"--input-shape {list(given)} does not fit {path.name}'s input {info.name!r} "
                f"{info.shape} (give the shape without the batch axis)"
            )
            raise UserError(msg)
        return [int(g) for g in given]
    if not all(isinstance(d, int) for d in declared):
        msg = (
            f"{path.name}'s input {info.name!r} {info.shape} has dynamic axes besides the "
            "batch; pass --input-shape, e.g. --input-shape 3 224 224 (or 128 for tokens)"
        )
        raise UserError(msg)
    return list(declared)


def params_and_precision(path: Path) -> tuple[int, str]:
    """Weights in the file (Q/DQ scales and zero points left out) and fp32 or int8."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    quant_params: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            quant_params.update(node.input[1:])
    params = 0
    for init in graph.initializer:
        if init.name not in quant_params and len(init.dims) > 0:
            count = 1
            for dim in init.dims:
                count *= dim
            params += count
    precision = "int8" if any(n.op_type in _INT8_OPS for n in graph.node) else "fp32"
    return params, precision


def bench_summary(report: Report) -> dict[str, Any]:
    """Each row's p50 latency relative to the first row's (side-by-side speedups).

    Keys are the file names, with the runtime added when more than one measured.
    """
    if not report.rows:
        return {}
    first = report.rows[0].latency_ms["p50"]
    several = len({r.runtime for r in report.rows}) > 1
    return {
        (f"{r.name} ({r.runtime})" if several else r.name): round(first / r.latency_ms["p50"], 3)
        for r in report.rows
    }
