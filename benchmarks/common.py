"""What the benchmark scripts share: side-by-side timing, the INT8 quantizers compared,
a Markdown table on stdout and a results file."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

import compressor as cz
from compressor._io import write_text
from compressor.data import DataSpec
from compressor.runtime.measure import (
    environment,
    interleaved_runs,
    onnx_predictor,
    top1,
)
from compressor.stage import RunContext, State

TABLE_RUN: dict[str, Any] = {"threads": 2, "progress": False, "throughput_batch": 1}
"""`Pipeline.run` settings of a benchmark run whose table has no throughput column: two
threads, no progress, and throughput timed at batch 1, not on batches of 32 per row."""


def side_by_side(runs: dict[Any, Callable[[], Any]], rounds: int = 3) -> dict[Any, dict[str, Any]]:
    """p50/p90 milliseconds of each call, measured in interleaved rounds.

    Each round times every call once with compressor's timing loop (warm-up, then until the
    median settles), so a slow spell of a shared machine falls on all of them alike rather
    than on whichever ran then. The times of all rounds are pooled.
    """
    result = {}
    for name, timing in interleaved_runs(runs, rounds=rounds).items():
        ms = np.asarray(timing.times) * 1e3
        result[name] = {
            "p50": round(float(np.median(ms)), 3),
            "p90": round(float(np.percentile(ms, 90)), 3),
            "repeats": len(ms),
            "stable": timing.stable,
        }
    return result


def files_p50(
    files: dict[str, Path], example: Any, threads: int = 2, runtime: str = "onnxruntime"
) -> dict[str, float]:
    """Batch-1 p50 milliseconds of each ONNX file in ``runtime``, in interleaved rounds."""
    predict = {name: onnx_predictor(path, threads, runtime) for name, path in files.items()}
    timings = side_by_side({n: (lambda p=p: p(example)) for n, p in predict.items()})
    return {name: timings[name]["p50"] for name in files}


def mean_spread(values: list[float]) -> str:
    """``mean ± standard deviation`` of ``values`` with two decimals."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def cell(value: Any) -> str:
    """A table cell: millions for big counts, '-' for missing values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value >= 100_000:
        return f"{value / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as a Markdown table of ``columns`` (header, key)."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(k)) for _, k in columns) + " |")


def write_results(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` with the settings and the machine as JSON (atomically)."""
    threads = settings.get("threads", 1)
    data = {"settings": settings, "environment": environment(threads), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)


def cpu_context(data: DataSpec, out: Path, threads: int, **settings: Any) -> RunContext:
    """A quiet RunContext on the CPU: ``data`` for training and evaluation, cross-entropy, top-1."""
    return RunContext(
        train_data=data,
        eval_data=data,
        output_dir=out,
        loss_fn=torch.nn.functional.cross_entropy,
        eval_fn=top1,
        device=torch.device("cpu"),
        threads=threads,
        progress=False,
        **settings,
    )


def compressor_int8(
    model: torch.nn.Module,
    example: torch.Tensor,
    data: DataSpec,
    out: Path,
    threads: int,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    placement: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """compressor's Int8Quantization stage on ``model``; the file and the stage's details.

    ``runtimes`` are those its FP32 placement times the suspect nodes in; ``placement``
    False turns that timing off (every node INT8).
    """
    out.mkdir(parents=True, exist_ok=True)
    ctx = cpu_context(
        data, out, threads, step="int8_quantization", runtimes=tuple(dict.fromkeys(runtimes))
    )
    stage = cz.Int8Quantization(
        calibration_samples=sum(len(x) for x, _ in data), fp32_placement=placement
    )
    state = stage.apply(State(model=model, teacher=model, example_input=example), ctx)
    return state.onnx_path, state.details


def calibration_data(size: int, samples: int) -> DataSpec:
    """Seeded random images in batches of 8 (calibration ranges only; latency ignores values)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, size, size, generator=generator)
    labels = torch.zeros(8, dtype=torch.long)
    return DataSpec([(images[i : i + 8], labels) for i in range(0, samples, 8)])


def calibration_reader(data: DataSpec) -> Any:
    """An ONNX Runtime CalibrationDataReader over the inputs of ``data``, fed to ``input``."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()} for x, _ in data])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Reader()


def ort_default_int8(fp32: Path, data: DataSpec, out: Path) -> Path:
    """ONNX Runtime's quantize_static with every option at its default."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), calibration_reader(data))
    return out


def nncf_int8(fp32: Path, data: DataSpec, out: Path) -> Path | None:
    """nncf.quantize on the FP32 ONNX model with its defaults; None without nncf."""
    try:
        import nncf
    except ImportError:
        return None
    import onnx

    samples = [x[i : i + 1].numpy() for x, _ in data for i in range(x.shape[0])]
    dataset = nncf.Dataset(samples, lambda x: {"input": x})
    quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(samples))
    onnx.save(quantized, str(out))
    return out
