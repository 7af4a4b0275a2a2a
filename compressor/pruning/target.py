"""Pruning to a target: the ratio at which MACs, parameters, file size or latency fall under it.

`StructuredPruning` takes one of ``target_macs``, ``target_params``, ``target_size_mb`` or
``target_latency_ms`` instead of a ``ratio``. `find_ratio` searches the ratio: each candidate
is pruned on a copy and measured. MACs and parameters are counted; size and latency are
measured on the artifact the pipeline will write: the candidate is exported, quantized as the
following `Int8Quantization` would (for latency with its FP32 placement: a stem that runs
faster in FP32 stays so; no INT8 stage follows: its FP32 export), and its file size read and
its batch-1 latency timed in the runtime named by ``target_runtime``. The search keeps
the least pruning that meets the target, so the most accuracy survives.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RecipeError
from ..row import amount
from ..runtime.measure import count_params_macs, onnx_predictor, sample_batch, timed_runs

if TYPE_CHECKING:
    from ..stage import Quantizer, RunContext

TARGETS = {
    "target_macs": "MACs",
    "target_params": "parameters",
    "target_size_mb": "MB",
    "target_latency_ms": "ms",
}
"""The target options of `StructuredPruning`, and the unit each is given in."""
MEASURED = ("target_size_mb", "target_latency_ms")
"""Targets met by building and measuring the artifact (the others are counted)."""
TIMED = ("target_latency_ms",)
"""Targets whose candidates get the INT8 stage's FP32 placement (it changes speed, not size)."""
MAX_RATIO = 0.95
"""The largest ratio the search tries."""
_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_amount(stage: str, option: str, value: Any) -> float | None:
    """``value`` as a positive finite number: a number, or text like ``1.5e8``, ``300M``, ``2G``.

    Raises:
        RecipeError: anything else, naming the value and what is allowed.
    """
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*", value.lower())
        if found:
            with contextlib.suppress(ValueError):
                number = float(found[1]) * _SUFFIXES[found[2]]
    if number is None or not math.isfinite(number) or number <= 0:
        msg = (
            f"{stage}.{option} must be a positive number of {TARGETS[option]}, e.g. 2.5, "
            f"1.5e8 or 150M (got: {value!r})"
        )
        raise RecipeError(msg)
    return number


@dataclass
class TargetSearch:
    """What the search for a target's ratio tried and found (the report's ``target``)."""

    option: str
    value: float
    model_value: float
    ratio: float = 0.0
    reached: float = math.nan
    met: bool = False
    runtime: str | None = None
    trace: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    importance: dict[str, Any] | None = None  # what ``importance: auto`` tried, and chose

    def to_dict(self) -> dict[str, Any]:
        """Plain data for report.json."""
        return {
            "option": self.option,
            "unit": TARGETS[self.option],
            "value": self.value,
            "model_value": _round(self.model_value),
            "ratio": round(self.ratio, 4),
            "reached": _round(self.reached),
            "met": self.met,
            **({"runtime": self.runtime} if self.runtime else {}),
            "trace": self.trace,
            "seconds": round(self.seconds, 2),
            **({"importance": self.importance} if self.importance else {}),
        }

    def note(self) -> str | None:
        """A sentence when the target was not met, with the numbers and what to try."""
        if self.met:
            return None
        unit = TARGETS[self.option]
        return (
            f"{self.option} {amount(self.value)} {unit} was not reached: the most pruning tried "
            f"(ratio {self.ratio:.2f}) reaches {amount(self.reached)} {unit}; lower "
            "round_to or max_layer_ratio's cap, prune fewer layers by hand, or relax the target"
        )


def find_ratio(
    prune_at: Callable[[float], nn.Module],
    measure: Callable[[nn.Module], float],
    option: str,
    value: float,
    model_value: float,
    *,
    rel_tol: float,
    max_steps: int,
    runtime: str | None = None,
    describe: Callable[[nn.Module], dict[str, Any]] | None = None,
    first: float | None = None,
) -> TargetSearch:
    """The smallest ratio whose pruned model measures at most ``value``.

    ``first``: a ratio to try before all others and keep if it meets the target (the one a
    sparsity stage already drove to zero); when it misses, the search goes on above it.

    ``prune_at(r)`` returns a pruned copy at ratio ``r`` and ``measure`` its quantity (which
    falls as ``r`` grows). The bracket [0, `MAX_RATIO`] is narrowed by interpolating on
    ``q(r) = a + b * (1 - r)**2`` (MACs fall about so) and bisection, until a candidate is
    within ``rel_tol`` below the target or ``max_steps`` candidates were measured.
    ``describe`` adds fields to each candidate's trace entry.
    """
    start = time.perf_counter()
    search = TargetSearch(option, value, model_value, runtime=runtime)

    def at(ratio: float) -> float:
        model = prune_at(ratio)
        quantity = measure(model)
        extra = describe(model) if describe else {}
        search.trace.append({"ratio": round(ratio, 4), "value": _round(quantity), **extra})
        return quantity

    low, q_low = 0.0, model_value
    if first is not None:
        quantity = at(first)
        if quantity <= value:
            search.ratio, search.reached, search.met = first, quantity, True
            search.seconds = time.perf_counter() - start
            return search
        low, q_low = first, quantity
    high = MAX_RATIO
    q_high = at(high)
    if q_high > value:
        search.ratio, search.reached = high, q_high
    else:
        search.ratio, search.reached, search.met = high, q_high, True
        for _ in range(max_steps - 1):
            if search.reached >= value * (1 - rel_tol) or high - low < 0.005:
                break
            ratio = _guess(low, q_low, high, q_high, value)
            quantity = at(ratio)
            if quantity <= value:
                high, q_high = ratio, quantity
                search.ratio, search.reached = ratio, quantity
            else:
                low, q_low = ratio, quantity
    search.seconds = time.perf_counter() - start
    return search


def _guess(low: float, q_low: float, high: float, q_high: float, value: float) -> float:
    """The next ratio to try inside (low, high): interpolated, kept off the ends."""
    u_low, u_high = (1 - low) ** 2, (1 - high) ** 2
    if q_low != q_high and u_low != u_high:
        slope = (q_low - q_high) / (u_low - u_high)
        u = u_high + (value - q_high) / slope
        ratio = 1 - math.sqrt(max(u, 0.0))
    else:
        ratio = (low + high) / 2
    margin = 0.1 * (high - low)
    return min(max(ratio, low + margin), high - margin)


def counted(option: str, example: torch.Tensor) -> Callable[[nn.Module], float]:
    """The measure of a counted target: the model's MACs or parameters."""
    index = 1 if option == "target_macs" else 0
    return lambda model: float(count_params_macs(model, example)[index])


def artifact_measure(
    option: str,
    example: torch.Tensor,
    ctx: RunContext,
    quantizer: Quantizer | None,
    runtime: str,
) -> Callable[[nn.Module], float]:
    """The measure of a measured target: the artifact's size in MB or batch-1 p50 in ms.

    The model is exported and, when ``quantizer`` (the quantizing stage that follows) is
    given, quantized as it would be, calibrated on a few training samples (the scales change
    neither size nor speed), for latency with the stage's FP32 placement. Latency is the
    median of three timings.
    """
    from ..runtime.export import export_onnx

    x1 = sample_batch(ctx.eval_data, 1)

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="compressor-target-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            export_onnx(
                model,
                example,
                path,
                threads=ctx.threads,
                atol=1e-2,
                rtol=1e-2,
                labels=ctx.io.labels,
            )
            if quantizer is not None:
                out = Path(tmp) / "candidate.int8.onnx"
                path, _ = quantizer.quantize_sample(path, out, ctx, placement=option in TIMED)
            if option == "target_size_mb":
                return path.stat().st_size / 1e6
            predict = onnx_predictor(path, ctx.threads, runtime)
            # three timings, their median: one slow spell of a shared machine moves none
            runs = [timed_runs(lambda: predict(x1), max_time_s=3.0) for _ in range(3)]
            return statistics.median(t.median for t in runs) * 1e3

    return measure


def search_target(
    model: nn.Module,
    example: torch.Tensor,
    option: str,
    value: float,
    prune_copy: Callable[[nn.Module, float], nn.Module],
    ctx: RunContext | None,
    runtime: str,
    first: float | None = None,
) -> TargetSearch:
    """Search the ratio at which ``model`` pruned by ``prune_copy`` meets the target
    (trying ``first`` first, see `find_ratio`).

    Raises:
        RecipeError: the model already meets the target (nothing to prune), or a measured
            target without a run context to measure in.
    """
    if option in MEASURED:
        if ctx is None:
            msg = f"structured_pruning.{option} is measured on the artifact: run it in a Pipeline"
            raise RecipeError(msg)
        measure = artifact_measure(option, example, ctx, ctx.quantizer(), runtime)
        rel_tol, steps = 0.05, 7

        def describe(m: nn.Module) -> dict[str, Any]:
            return {"macs": count_params_macs(m, example)[1]}
    else:
        measure = counted(option, example)
        rel_tol, steps, runtime, describe = 0.01, 12, None, None
    model_value = measure(model)
    unit = TARGETS[option]
    if value >= model_value:
        msg = (
            f"structured_pruning.{option} {amount(value)} {unit} is not below the model's "
            f"{amount(model_value)} {unit}: nothing to prune; give a smaller target"
        )
        raise RecipeError(msg)
    return find_ratio(
        lambda r: prune_copy(copy.deepcopy(model), r),
        measure,
        option,
        value,
        model_value,
        rel_tol=rel_tol,
        max_steps=steps,
        runtime=runtime,
        describe=describe,
        first=first,
    )


def _round(value: float) -> float:
    if not math.isfinite(value):
        return value
    return float(f"{value:.6g}")
