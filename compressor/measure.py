"""Every measurement the report holds, taken the same way for torch and ONNX Runtime.

Accuracy runs the eval data through a ``predict`` callable (a torch module or an ONNX
Runtime session behind the same signature); latency and throughput time that same
callable with warm-up, a fixed thread count and medians.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import DataSpec
from .report import Row

Predict = Callable[[torch.Tensor], torch.Tensor]
EvalFn = Callable[[Predict, DataSpec], float]


def default_threads() -> int:
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def top1(predict: Predict, data: DataSpec) -> float:
    """Top-1 accuracy of ``predict`` over all of ``data`` (the default metric)."""
    correct = total = 0
    for batch in data:
        logits = predict(data.input_fn(batch))
        targets = torch.as_tensor(data.target_fn(batch))
        correct += int((logits.argmax(dim=1).cpu() == targets.cpu()).sum())
        total += int(targets.numel())
    return correct / total if total else float("nan")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_predictor(model: nn.Module) -> Predict:
    """``predict`` for a torch model on the CPU (eval mode, inference mode)."""
    model.eval()

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = model(inputs.cpu())
        return out[0] if isinstance(out, (tuple, list)) else out

    return predict


def ort_session(path: str | Path, threads: int, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and fixed threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predictor(session: Any) -> Predict:
    """``predict`` for an ONNX Runtime session with one input; returns the first output."""
    name = session.get_inputs()[0].name

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(session.run(None, {name: array})[0])

    return predict


def timed_runs(
    run: Callable[[], Any],
    *,
    min_time_s: float = 1.0,
    min_repeats: int = 10,
    max_repeats: int = 2000,
    warmup: int = 5,
) -> list[float]:
    """Wall times (seconds) of ``run()`` after ``warmup`` calls.

    Repeats until both ``min_repeats`` and ``min_time_s`` are reached, or ``max_repeats``.
    """
    for _ in range(warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and time.perf_counter() - start >= min_time_s:
            break
    return times


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def sample_batch(data: DataSpec, batch_size: int) -> torch.Tensor:
    """A batch of ``batch_size`` real inputs from ``data`` (samples repeat if it is small)."""
    parts: list[torch.Tensor] = []
    count = 0
    for batch in data:
        inputs = data.input_fn(batch).detach().cpu()
        parts.append(inputs)
        count += inputs.shape[0]
        if count >= batch_size:
            break
    pool = torch.cat(parts)
    reps = -(-batch_size // pool.shape[0])
    return pool.repeat(reps, *([1] * (pool.dim() - 1)))[:batch_size].contiguous()


def speed(predict: Predict, data: DataSpec, *, batch_size: int, throughput_batch: int) -> dict:
    """p50/p95 latency at ``batch_size`` and throughput at ``throughput_batch``."""
    x1 = sample_batch(data, batch_size)
    times = timed_runs(lambda: predict(x1))
    xt = sample_batch(data, throughput_batch)
    times_t = timed_runs(lambda: predict(xt), min_repeats=5)
    return {
        "latency_ms": {
            "batch_size": batch_size,
            "p50": round(statistics.median(times) * 1e3, 4),
            "p95": round(_percentile(times, 95) * 1e3, 4),
        },
        "throughput": {
            "batch_size": throughput_batch,
            "samples_per_s": round(throughput_batch / statistics.median(times_t), 2),
        },
    }


def count_params_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Parameter count and multiply-accumulates of one forward pass at batch 1."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_input.cpu())
    finally:
        model.train(was_training)
    return int(params), int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialized state_dict (the torch rows' size)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure_torch(
    model: nn.Module,
    *,
    name: str,
    data: DataSpec,
    eval_fn: EvalFn,
    example_input: torch.Tensor,
    threads: int,
    throughput_batch: int = 32,
    details: dict[str, Any] | None = None,
) -> Row:
    """Measure a torch model on the CPU: accuracy, size, params, MACs, latency."""
    model = model.cpu().eval()
    params, macs = count_params_macs(model, example_input)
    with torch_threads(threads):
        predict = torch_predictor(model)
        accuracy = float(eval_fn(predict, data))
        timing = speed(predict, data, batch_size=1, throughput_batch=throughput_batch)
    return Row(
        name=name,
        runtime="torch",
        precision="fp32",
        accuracy=accuracy,
        params=params,
        macs=macs,
        size_bytes=state_dict_bytes(model),
        details=details or {},
        **timing,
    )


def measure_onnx(
    path: str | Path,
    *,
    name: str,
    precision: str,
    data: DataSpec,
    eval_fn: EvalFn,
    params: int,
    macs: int,
    threads: int,
    throughput_batch: int = 32,
    details: dict[str, Any] | None = None,
) -> Row:
    """Measure an ONNX file in ONNX Runtime: accuracy from running it, file size, latency."""
    predict = ort_predictor(ort_session(path, threads))
    accuracy = float(eval_fn(predict, data))
    timing = speed(predict, data, batch_size=1, throughput_batch=throughput_batch)
    return Row(
        name=name,
        runtime="onnxruntime",
        precision=precision,
        accuracy=accuracy,
        params=params,
        macs=macs,
        size_bytes=Path(path).stat().st_size,
        details=details or {},
        **timing,
    )


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and its INT8-relevant instruction-set features."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name":
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")
    features = [f for f in wanted if f in flags]
    if platform.machine().lower() in ("arm64", "aarch64") and not flags:
        features = ["asimddp"]  # Apple silicon and other ARMv8.4+ CPUs without /proc/cpuinfo
    return name, features


def environment(threads: int) -> dict[str, Any]:
    """Versions, CPU and threads, recorded in every report."""
    import onnx
    import onnxruntime

    cpu, features = cpu_info()
    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_features": features,
        "threads": threads,
    }
