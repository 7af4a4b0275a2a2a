"""A per-layer latency table of the INT8 model, for latency-aware pruning allocation.

Each Conv2d and Linear layer is exported alone at its input shape in the model (batch 1),
quantized as the INT8 stage does it (static QDQ), and timed in the runtime that will run the
artifact at three widths: as it is, with half its output channels, and with half its input
channels. A layer's milliseconds saved per output (input) channel removed are the slopes
between those timings. A coupled channel group removes output channels of the layers that
produce it and input channels of the layers that read it, so its cost is the sum of their
slopes: `channel_costs`. With ``StructuredPruning(latency_aware=True)`` the global allocation
ranks channels by importance per millisecond saved instead of by importance alone.

Timings are kept per layer shape, runtime and thread count for the life of the process: the
plan is made again by sparsity training, pruning and every ratio a target search tries.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DataSpec
from ..inputs import call
from ..runtime.export import export_onnx
from ..runtime.measure import interleaved_runs, onnx_predictor
from ..stage import default_quantizer

FLOOR = 0.05
"""A group's cost is at least this share of the mean group's: timing noise can make a
small layer's slope zero or negative, and a free channel must not look infinitely cheap."""

ROUNDS = 4
"""Alternating timing rounds per layer (see `_timed`)."""
WIDTHS = ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5))
"""The (output, input) channel shares each layer is timed at: as it is, half out, half in."""

_TIMINGS: dict[tuple[Any, ...], float] = {}


@dataclass(frozen=True)
class LayerSlopes:
    """One layer's INT8 latency (ms) and the ms saved per output / input channel removed."""

    ms: float
    per_out_channel: float
    per_in_channel: float


def layer_slopes(
    model: nn.Module, example: torch.Tensor, runtime: str, threads: int
) -> dict[str, LayerSlopes]:
    """The latency table: every Conv2d and Linear of ``model`` timed alone (see module doc)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            call(model.eval(), example)
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    table = {}
    for name, shape in shapes.items():
        layer = modules[name]
        times = _timed(layer, shape, runtime, threads)
        if times is None:
            continue
        full, out_half, in_half = times
        cout, cin = _widths(layer)
        table[name] = LayerSlopes(
            ms=full,
            per_out_channel=_slope(full, out_half, cout),
            per_in_channel=_slope(full, in_half, cin),
        )
    return table


def timings() -> dict[tuple[Any, ...], float]:
    """Every layer timing this process holds (to share with other ranks)."""
    return dict(_TIMINGS)


def adopt_timings(found: Mapping[tuple[Any, ...], float]) -> None:
    """Use ``found`` (another rank's `timings`) for those shapes: ranks must plan alike."""
    _TIMINGS.update(found)


def channel_costs(groups: Sequence[Any], table: Mapping[str, LayerSlopes]) -> dict[str, float]:
    """Each group's ms saved per channel removed, relative to the mean group (1.0).

    ``groups`` are `PlannedGroup`s: their ``members`` lose output channels, their
    ``consumers`` input channels. A group none of whose layers was timed costs the mean.
    """
    raw: dict[str, float] = {}
    for g in groups:
        slopes = [table[m].per_out_channel for m in g.members if m in table]
        slopes += [table[c].per_in_channel for c in g.consumers if c in table]
        if slopes:
            raw[g.root] = sum(slopes)
    if not raw:
        return {g.root: 1.0 for g in groups}
    mean = statistics.mean(max(v, 0.0) for v in raw.values()) or 1.0
    return {g.root: max(raw.get(g.root, mean) / mean, FLOOR) for g in groups}


def _widths(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels


def _half(width: int) -> int:
    return max(1, width // 2)


def _slope(full: float, half: float, width: int) -> float:
    """ms saved per channel between ``width`` channels and `_half` of them (0 for one)."""
    return (full - half) / (width - _half(width)) if width > 1 else 0.0


def _timed(
    layer: nn.Module, shape: tuple[int, ...], runtime: str, threads: int
) -> tuple[float, float, float] | None:
    """The batch-1 median ms of ``layer``'s shape at each of `WIDTHS`, INT8, in ``runtime``.

    The widths not timed yet are timed together, in alternating rounds: a burst of load
    from another process must not make the half-width layer look slower than the whole one.
    """
    variants = [_variant(layer, shape, share, runtime, threads) for share in WIDTHS]
    if any(v is None for v in variants):
        return None
    missing = {key: build() for key, build in variants if key not in _TIMINGS}
    if missing:
        _TIMINGS.update(_time_int8(missing, runtime, threads))
    full, out_half, in_half = (_TIMINGS[key] for key, _ in variants)
    return full, out_half, in_half


def _variant(
    layer: nn.Module,
    shape: tuple[int, ...],
    shares: tuple[float, float],
    runtime: str,
    threads: int,
) -> tuple[tuple[Any, ...], Callable[[], tuple[nn.Module, torch.Tensor]]] | None:
    """The timing key, and what builds the single layer and its input at these channel
    shares (only when the key is not timed yet)."""
    out_share, in_share = shares
    cout, cin = _widths(layer)
    cout = cout if out_share == 1.0 else _half(cout)
    cin = cin if in_share == 1.0 else _half(cin)
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        if groups > 1:  # grouped and depthwise convs: the groups shrink with the width
            if groups == layer.in_channels == layer.out_channels:
                cin = cout = groups = min(cin, cout)
            elif cin % groups or cout % groups:
                return None
        key = ("conv", cin, cout, layer.kernel_size, layer.stride, layer.padding,
               layer.dilation, groups, tuple(shape[2:]), runtime, threads)  # fmt: skip
        conv = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        return key, lambda: (
            nn.Conv2d(cin, cout, *conv, groups=groups).eval(),
            torch.randn(1, cin, *shape[2:]),
        )
    key = ("linear", cin, cout, tuple(shape[1:-1]), runtime, threads)
    return key, lambda: (nn.Linear(cin, cout).eval(), torch.randn(1, *shape[1:-1], cin))


def _time_int8(
    layers: Mapping[tuple[Any, ...], tuple[nn.Module, torch.Tensor]], runtime: str, threads: int
) -> dict[tuple[Any, ...], float]:
    """Each layer quantized as the INT8 stage does it, its median ms timed interleaved."""
    quantizer = default_quantizer()
    runs = {}
    with (
        tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        for i, (key, (layer, inputs)) in enumerate(layers.items()):
            fp32, int8 = Path(tmp) / f"layer{i}.onnx", Path(tmp) / f"layer{i}.int8.onnx"
            export_onnx(layer, inputs, fp32, threads=threads, atol=1e-2, rtol=1e-2)
            calibration = DataSpec([(torch.randn(8, *inputs.shape[1:]), torch.zeros(8))])
            quantizer.quantize_layer(fp32, int8, calibration, samples=8)
            predict = onnx_predictor(int8, threads, runtime)
            runs[key] = lambda p=predict, x=inputs: p(x)
        timings = interleaved_runs(runs, rounds=ROUNDS, min_time_s=0.05, max_time_s=0.25)
    return {key: timing.median * 1e3 for key, timing in timings.items()}


def latency_costs(
    model: nn.Module, example: torch.Tensor, runtime: str, threads: int
) -> tuple[Any, dict[str, Any]]:
    """``cost(groups)`` for `plan_groups`, and the record the report shows of it."""
    start = time.perf_counter()
    table = layer_slopes(model, example, runtime, threads)
    record: dict[str, Any] = {
        "runtime": runtime,
        "threads": threads,
        "layers": len(table),
        "layers_ms": round(sum(s.ms for s in table.values()), 4),
        "seconds": round(time.perf_counter() - start, 2),
    }

    def cost(groups: Sequence[Any]) -> dict[str, float]:
        costs = channel_costs(groups, table)
        record["groups"] = [
            {"group": root, "relative_ms_per_channel": round(value, 4)}
            for root, value in sorted(costs.items(), key=lambda kv: -kv[1])
        ]
        return costs

    return cost, record
