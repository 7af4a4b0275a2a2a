"""The INT8 types that are fast and exact on this CPU, and why."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..runtime.measure import (
    cpu_info,
)

if TYPE_CHECKING:
    pass


TYPES = ("auto", "uint8", "int8")


@dataclass(frozen=True)
class QuantTypes:
    """The INT8 types chosen for the CPU, and why."""

    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str


def choose_types(
    activation_type: str = "auto",
    weight_type: str = "int8",
    reduce_range: bool | None = None,
    *,
    machine: str | None = None,
    features: list[str] | None = None,
) -> QuantTypes:
    """Pick the INT8 types that are fast, and exact, on this CPU (or the one described).

    x86: ONNX Runtime's fast INT8 kernels take uint8 activations with int8 weights
    (int8 activations run at about FP32 speed). Without VNNI they multiply with
    VPMADDUBSW, whose 16-bit sums can saturate, so weights use 7 bits (``reduce_range``).
    ARM64: the dot-product kernels take int8 activations and weights.
    """
    machine = (machine or platform.machine()).lower()
    if features is None:
        features = cpu_info()[1]
    x86 = machine in ("x86_64", "amd64", "i386", "i686", "x86")
    vnni = any(f in features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    if x86:
        act = "uint8"
        reason = (
            "x86 CPU: ONNX Runtime's fast INT8 kernels take uint8 activations with int8 weights"
        )
        rr = not vnni
        reason += (
            "; VNNI present, full 8-bit weights"
            if vnni
            else "; no VNNI, so 7-bit weights (reduce_range) avoid VPMADDUBSW saturation"
        )
    else:
        act, rr = "int8", False
        reason = f"{machine} CPU: int8 activations and weights suit its dot-product kernels"
    if activation_type != "auto":
        act = activation_type
        reason = f"activation_type {activation_type} set by the user"
    if reduce_range is not None:
        rr = reduce_range
        reason += f"; reduce_range {reduce_range} set by the user"
    return QuantTypes(act, weight_type, rr, reason)
