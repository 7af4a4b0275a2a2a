"""Every measurement the report holds, taken the same way in torch and every ONNX runtime.

Accuracy runs the eval data through a ``predict`` callable (a torch module, an ONNX
Runtime session or an OpenVINO compiled model behind the same signature); latency and
throughput time that same callable with warm-up, a fixed thread count and medians.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..data import DataSpec
from ..errors import UserError
from ..inputs import Inputs, call, cat, feeds, repeat_to, rows, to_device
from ..models.model_io import logits_of
from ..models.model_io import top1 as top1  # the default metric, importable from here as before
from ..row import Row
from .onnx_files import onnx_size
from .runtimes import ONNX_RUNTIMES, openvino_settings, ort_options, runtime_versions

K = TypeVar("K")
Predict = Callable[[Inputs], torch.Tensor]
EvalFn = Callable[[Predict, DataSpec], float]


class Recorder(Protocol):
    """Keeps what an evaluation's predictor calls give (`compressor.runtime.parity`'s
    ``OutputRecorder``)."""

    def wrap(self, predict: Predict) -> Predict:
        """``predict``, recording each call."""
        ...


def default_threads() -> int:
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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

    def predict(inputs: Inputs) -> torch.Tensor:
        with torch.inference_mode():
            out = call(model, to_device(inputs, "cpu"))
        return logits_of(out)  # a dict, tuple or Hugging Face output: the one tensor

    return predict


def ort_session(path: str | Path, threads: int, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and fixed threads."""
    import onnxruntime as ort

    options = ort_options(threads)
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predictor(session: Any) -> Predict:
    """``predict`` for an ONNX Runtime session (inputs fed by name, see `feeds`); returns
    the first output."""
    names = [i.name for i in session.get_inputs()]

    def predict(inputs: Inputs) -> torch.Tensor:
        return torch.from_numpy(session.run(None, feeds(inputs, names))[0])

    return predict


@functools.cache
def _openvino_core() -> Any:
    import openvino

    return openvino.Core()


def openvino_model(path: str | Path, threads: int) -> Any:
    """The ONNX file compiled by OpenVINO for the CPU with `openvino_settings`."""
    return _openvino_core().compile_model(str(path), "CPU", openvino_settings(threads))


def openvino_predictor(compiled: Any) -> Predict:
    """``predict`` for an OpenVINO compiled model (inputs fed by name, see `feeds`);
    returns the first output."""
    request = compiled.create_infer_request()
    output = compiled.output(0)
    names = [port.get_any_name() for port in compiled.inputs]

    def predict(inputs: Inputs) -> torch.Tensor:
        result = request.infer(feeds(inputs, names), share_inputs=True)
        return torch.from_numpy(np.array(result[output]))

    return predict


def onnx_predictor(path: str | Path, threads: int, runtime: str = "onnxruntime") -> Predict:
    """``predict`` for an ONNX file in ``runtime`` (one of `ONNX_RUNTIMES`)."""
    if runtime == "onnxruntime":
        return ort_predictor(ort_session(path, threads))
    if runtime == "openvino":
        return openvino_predictor(openvino_model(path, threads))
    msg = f"unknown runtime {runtime!r}; allowed: {', '.join(ONNX_RUNTIMES)}"
    raise UserError(msg)


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, and whether their median had settled."""

    times: list[float]
    stable: bool

    @property
    def median(self) -> float:
        """The median wall time in seconds."""
        return statistics.median(self.times)


def timed_runs(
    run: Callable[[], Any],
    *,
    warmup: int = 5,
    warmup_s: float = 1.0,
    min_repeats: int = 20,
    min_time_s: float = 0.5,
    max_time_s: float = 10.0,
    rel_tol: float = 0.02,
) -> Timing:
    """Time ``run()`` after a warm-up until the median is stable.

    The warm-up is ``warmup`` calls, or fewer once they took ``warmup_s`` seconds: a call
    that takes a second or more is warm after one. After ``min_repeats`` calls and
    ``min_time_s`` seconds, each round adds about a quarter more calls; timing stops once the
    median moves by at most ``rel_tol`` between rounds, or after ``max_time_s`` seconds
    (then ``stable`` is False).
    """
    start = time.perf_counter()
    for _ in range(warmup):
        run()
        if time.perf_counter() - start >= warmup_s:
            break
    times: list[float] = []
    previous: float | None = None
    start = time.perf_counter()
    while True:
        for _ in range(max(min_repeats - len(times), len(times) // 4, 1)):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if elapsed < min_time_s and elapsed < max_time_s:
            continue
        median = statistics.median(times)
        if previous is not None and abs(median - previous) <= rel_tol * previous:
            return Timing(times, stable=True)
        if elapsed >= max_time_s:
            return Timing(times, stable=False)
        previous = median


def interleaved_runs(
    runs: Mapping[K, Callable[[], Any]],
    *,
    rounds: int = 3,
    min_time_s: float = 0.5,
    max_time_s: float = 10.0,
) -> dict[K, Timing]:
    """Each of ``runs`` timed in alternating rounds; the times of all rounds pooled.

    Each round gives every run its own `timed_runs`; a burst of load from another process
    then slows all of them alike instead of the one being timed, so their differences (what
    a comparison or a slope uses) stay honest. A run is ``stable`` if its timing settled in
    every round.
    """
    times: dict[K, list[float]] = {key: [] for key in runs}
    stable = dict.fromkeys(runs, True)
    for _ in range(rounds):
        for key, run in runs.items():
            timing = timed_runs(run, min_time_s=min_time_s, max_time_s=max_time_s)
            times[key] += timing.times
            stable[key] &= timing.stable
    return {key: Timing(times[key], stable[key]) for key in runs}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def sample_batch(data: DataSpec, batch_size: int) -> Inputs:
    """A batch of ``batch_size`` real inputs from ``data`` (samples repeat if it is small)."""
    parts: list[Inputs] = []
    count = 0
    for batch in data:
        inputs = to_device(data.input_fn(batch), "cpu")
        parts.append(inputs)
        count += rows(inputs)
        if count >= batch_size:
            break
    return repeat_to(cat(parts), batch_size)


THROUGHPUT_MAX_S = 5.0  # per batch size: the median of >= 5 calls at the size settles sooner
THROUGHPUT_CALLS = 5
"""Calls of one batch size (after the first) an evaluation pass needs to give its throughput."""


class CallTimes:
    """The rows and wall time of each call an evaluation pass makes, so that the pass also
    gives the throughput at a batch size its calls had (`speed`'s ``measured``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def wrap(self, predict: Predict) -> Predict:
        """``predict``, timing each call."""

        def timed(inputs: Inputs) -> torch.Tensor:
            start = time.perf_counter()
            out = predict(inputs)
            self.calls.append((rows(inputs), time.perf_counter() - start))
            return out

        return timed

    def throughput(self, batch_size: int, rel_tol: float = 0.03) -> dict[str, Any] | None:
        """Samples/s at ``batch_size`` from the median call of that size (the first one is
        the warm-up), or None with fewer than `THROUGHPUT_CALLS` of them. ``stable``: the
        median moved by at most ``rel_tol`` over the last quarter of the calls."""
        times = [seconds for count, seconds in self.calls if count == batch_size][1:]
        if len(times) < THROUGHPUT_CALLS:
            return None
        median = statistics.median(times)
        earlier = statistics.median(times[: len(times) - len(times) // 4])
        return {
            "batch_size": batch_size,
            "samples_per_s": round(batch_size / median, 2),
            "stable": abs(median - earlier) <= rel_tol * earlier,
            "calls": len(times),
            "from": "evaluation",
        }


def speed(
    predict: Predict,
    data: DataSpec,
    *,
    batch_size: int = 1,
    throughput_batches: Sequence[int] = (32,),
    measured: CallTimes | None = None,
) -> dict[str, Any]:
    """p50/p95 latency at ``batch_size``, and throughput at each of ``throughput_batches``:
    from the evaluation pass's calls of that size when ``measured`` has enough of them,
    else timed here.

    Returns the row fields ``latency_ms``, ``throughput`` (the first throughput batch size)
    and ``throughput_by_batch`` (all of them).
    """
    x1 = sample_batch(data, batch_size)
    timing = timed_runs(lambda: predict(x1))
    by_batch = []
    for size in throughput_batches:
        found = measured.throughput(size) if measured else None
        if found:
            by_batch.append(found)
            continue
        xt = sample_batch(data, size)
        timed = timed_runs(
            lambda x=xt: predict(x), min_repeats=5, rel_tol=0.03, max_time_s=THROUGHPUT_MAX_S
        )
        by_batch.append(
            {
                "batch_size": size,
                "samples_per_s": round(size / timed.median, 2),
                "stable": timed.stable,
            }
        )
    return {
        "latency_ms": {
            "batch_size": batch_size,
            "p50": round(timing.median * 1e3, 4),
            "p95": round(_percentile(timing.times, 95) * 1e3, 4),
            "repeats": len(timing.times),
            "stable": timing.stable,
        },
        "throughput": by_batch[0],
        "throughput_by_batch": by_batch,
    }


class PeakMemory:
    """The process's peak resident memory while a block runs (Linux; elsewhere ``None``).

    Linux keeps a high-water mark of resident memory (VmHWM) that writing ``5`` to
    /proc/self/clear_refs resets; the block's peak is read after it. Freed heap is first
    handed back to the OS (glibc ``malloc_trim``), so that memory an earlier row freed but
    the allocator kept does not hide this block's increase.
    """

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _malloc_trim()
        self.start_bytes = _rss_bytes("VmRSS")
        self.peak_bytes: int | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
        except OSError:
            self.start_bytes = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start_bytes is not None:
            self.peak_bytes = _rss_bytes("VmHWM")

    def to_dict(self) -> dict[str, int] | None:
        """``peak_rss_bytes`` and ``increase_bytes`` (peak minus resident memory at the start)."""
        if self.start_bytes is None or self.peak_bytes is None:
            return None
        return {
            "peak_rss_bytes": self.peak_bytes,
            "increase_bytes": max(0, self.peak_bytes - self.start_bytes),
        }


def _malloc_trim() -> None:
    # Not glibc (no malloc_trim): the increase may then read low, never high.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return None


def count_params_macs(model: nn.Module, example_input: Inputs) -> tuple[int, int]:
    """Parameter count and multiply-accumulates of one forward pass at batch 1."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        # torch-pruning prints a warning per module it sees called with keywords only
        with contextlib.redirect_stdout(io.StringIO()):
            macs, params = tp.utils.count_ops_and_params(model, to_device(example_input, "cpu"))
    finally:
        model.train(was_training)
    return int(params), int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialized state_dict (the torch rows' size)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _evaluate(
    predict: Predict,
    data: DataSpec,
    eval_fn: EvalFn | None,
    known_accuracy: float | None,
    record: Recorder | None,
) -> tuple[float | None, CallTimes | None]:
    """The accuracy (``known_accuracy`` when given) and the timed calls of the pass."""
    if known_accuracy is not None or eval_fn is None:
        return known_accuracy, None
    calls = CallTimes()
    timed = calls.wrap(predict)  # inside the recorder: its copies are not timed
    return float(eval_fn(record.wrap(timed) if record else timed, data)), calls


def measure_torch(
    model: nn.Module,
    *,
    name: str,
    data: DataSpec,
    eval_fn: EvalFn | None,
    example_input: Inputs,
    threads: int,
    throughput_batches: Sequence[int] = (32,),
    details: dict[str, Any] | None = None,
    known_accuracy: float | None = None,
    record: Recorder | None = None,
) -> Row:
    """Measure a torch model on the CPU: accuracy, size, params, MACs, latency, memory.

    ``known_accuracy``: the accuracy of a model shown to give the same answers (its FP32
    export, see `compressor.pipeline.rows`), used instead of evaluating again; ``record``
    keeps the outputs of the evaluation for a later comparison."""
    start = time.perf_counter()
    model = model.cpu().eval()
    params, macs = count_params_macs(model, example_input)
    with torch_threads(threads), PeakMemory() as memory:
        predict = torch_predictor(model)
        accuracy, calls = _evaluate(predict, data, eval_fn, known_accuracy, record)
        timing = speed(predict, data, throughput_batches=throughput_batches, measured=calls)
    return Row(
        name=name,
        runtime="torch",
        precision="fp32",
        accuracy=accuracy,
        params=params,
        macs=macs,
        size_bytes=state_dict_bytes(model),
        memory=memory.to_dict(),
        seconds={"measure": round(time.perf_counter() - start, 2)},
        details=details or {},
        **timing,
    )


def measure_onnx(
    path: str | Path,
    *,
    name: str,
    precision: str,
    data: DataSpec,
    eval_fn: EvalFn | None,
    params: int | None,
    macs: int | None,
    threads: int,
    throughput_batches: Sequence[int] = (32,),
    latency_batch: int = 1,
    details: dict[str, Any] | None = None,
    runtime: str = "onnxruntime",
    known_accuracy: float | None = None,
    record: Recorder | None = None,
) -> Row:
    """Measure an ONNX file in ``runtime``: accuracy from running it there, file size, latency.

    ``eval_fn=None`` leaves accuracy out (``compressor bench`` has no labelled data);
    ``known_accuracy`` is used instead of evaluating (a file shown to give the same answers
    as one evaluated); ``record`` keeps the outputs of the evaluation for a later comparison.
    """
    start = time.perf_counter()
    with PeakMemory() as memory:
        predict = onnx_predictor(path, threads, runtime)
        accuracy, calls = _evaluate(predict, data, eval_fn, known_accuracy, record)
        timing = speed(
            predict,
            data,
            batch_size=latency_batch,
            throughput_batches=throughput_batches,
            measured=calls,
        )
    return Row(
        name=name,
        runtime=runtime,
        precision=precision,
        accuracy=accuracy,
        params=params,
        macs=macs,
        size_bytes=onnx_size(path),
        memory=memory.to_dict(),
        seconds={"measure": round(time.perf_counter() - start, 2)},
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


def int8_support(machine: str, features: Sequence[str]) -> str:
    """In words: which INT8 dot-product instructions the CPU has (from `cpu_info`)."""
    found = [
        label
        for flag, label in (
            ("amx_int8", "AMX-INT8"),
            ("avx512_vnni", "AVX-512 VNNI"),
            ("avx_vnni", "AVX-VNNI"),
            ("asimddp", "ARM dot product"),
            ("i8mm", "ARM I8MM"),
        )
        if flag in features
    ]
    if found:
        return ", ".join(found)
    if "avx2" in features:
        return "none (AVX2 only: INT8 runs on VPMADDUBSW, about 2x FP32 at best)"
    return f"none found ({machine})"


def environment(threads: int) -> dict[str, Any]:
    """Versions, CPU and its INT8 instructions, and threads, recorded in every report."""
    import onnx
    import onnxruntime

    from .._version import __version__

    cpu, features = cpu_info()
    return {
        "compressor": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        **runtime_versions(),
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_features": features,
        "int8_instructions": int8_support(platform.machine(), features),
        "threads": threads,
    }
