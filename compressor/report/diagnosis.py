"""Why a compressed model is not faster or lost accuracy: checks over a report's rows.

`diagnose` reads only what report.json holds (rows, their details, the environment), so
`compressor report` finds the same problems again when it re-renders an old report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..row import Row

ACCURACY_THRESHOLD = 0.01
"""Default accuracy drop (a fraction: 0.01 = 1 point) above which the report warns."""

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def diagnose(
    rows: Sequence[Row],
    environment: dict[str, Any],
    *,
    accuracy_threshold: float = ACCURACY_THRESHOLD,
) -> dict[str, Any]:
    """Problems of the final artifact against the baseline, and the causes found for them.

    Returns ``{"status": "ok" | "warning", "accuracy_threshold", "problems", "causes"}``;
    problems and causes are sentences.
    """
    problems: list[str] = []
    causes: list[str] = []
    base_torch = find_row(rows, "baseline", "torch")
    base_onnx = find_row(rows, "baseline", "onnxruntime")
    final = rows[-1] if rows else None
    if final is not None and base_torch is not None and final is not base_onnx:
        quant = _quantization(rows)
        slow = _speed_problems(final, base_onnx, quant) + _other_runtime_problems(rows, final)
        problems += slow
        if slow:
            causes += _speed_causes(quant, environment)
        drop = _accuracy_problem(final, base_torch, accuracy_threshold)
        if drop:
            problems.append(drop)
            causes += _accuracy_causes(rows, accuracy_threshold)
    unsettled = [r.label for r in rows if not settled(r)]
    if unsettled:
        problems.append(
            f"the batch-1 timing of {', '.join(unsettled)} did not settle before the time "
            "limit (the machine was busy or throttling): those latencies and the speedups "
            "built on them are uncertain; rerun on a quiet machine, or with fewer --threads"
        )
    return {
        "status": "warning" if problems else "ok",
        "accuracy_threshold": accuracy_threshold,
        "problems": problems,
        "causes": causes,
    }


def settled(row: Row) -> bool:
    """Whether the row's batch-1 timing settled (rows from before the flag count as settled)."""
    return row.latency_ms.get("stable", True) is not False


def find_row(rows: Sequence[Row], name: str, runtime: str) -> Row | None:
    """The first row with this name measured in this runtime, if any."""
    return next((r for r in rows if r.name == name and r.runtime == runtime), None)


def _quantization(rows: Sequence[Row]) -> dict[str, Any]:
    for row in reversed(rows):
        if "quantization" in row.details:
            return row.details["quantization"]
    return {}


def _speed_problems(final: Row, base_onnx: Row | None, quant: dict[str, Any]) -> list[str]:
    problems = []
    final_p50 = final.latency_ms.get("p50")
    if base_onnx is not None and final_p50 and final_p50 >= base_onnx.latency_ms.get("p50", 0):
        problems.append(
            f"The final model ({final.name}) is not faster than the FP32 ONNX baseline: "
            f"{final_p50:.3f} ms vs {base_onnx.latency_ms['p50']:.3f} ms p50 at batch 1."
        )
    speedup = quant.get("speedup_vs_fp32_onnx")
    if speedup is not None and speedup < 1.0:
        problems.append(
            f"INT8 quantization made the model slower: {speedup:.2f}x of the same model's FP32 "
            "ONNX speed at batch 1."
        )
    return problems


def _other_runtime_problems(rows: Sequence[Row], final: Row) -> list[str]:
    """The final file not faster than model.onnx in a runtime besides the final row's own."""
    problems = []
    for row in rows:
        if row.name != final.name or row.runtime in (final.runtime, "torch"):
            continue
        base = find_row(rows, "baseline", row.runtime)
        p50, base_p50 = row.latency_ms.get("p50"), base.latency_ms.get("p50") if base else None
        if p50 and base_p50 and p50 >= base_p50:
            problems.append(
                f"In {row.runtime}, the final model ({final.name}) is not faster than the FP32 "
                f"baseline: {p50:.3f} ms vs {base_p50:.3f} ms p50 at batch 1."
            )
    return problems


def _speed_causes(quant: dict[str, Any], environment: dict[str, Any]) -> list[str]:
    causes = []
    features = environment.get("cpu_features", [])
    machine = str(environment.get("machine", "")).lower()
    if not any(f in features for f in _DOT_PRODUCT):
        causes.append(
            f"The CPU ({environment.get('cpu', 'unknown')}) has no INT8 dot-product "
            "instructions (AVX-512 VNNI, AVX-VNNI, AMX or ARM dot product), so INT8 convolutions "
            "gain little over FP32 on it."
        )
    act = quant.get("activation_type")
    if machine in _X86 and act == "int8":
        causes.append(
            "Activations are int8 on an x86 CPU: ONNX Runtime's fast x86 INT8 kernels take "
            "uint8 activations (set int8_quantization.activation_type: auto or uint8)."
        )
    elif machine in ("arm64", "aarch64") and act == "uint8":
        causes.append(
            "Activations are uint8 on an ARM CPU, whose dot-product kernels take int8 "
            "(set int8_quantization.activation_type: auto or int8)."
        )
    floating = quant.get("float_compute_ops") or []
    if floating:
        names = ", ".join(floating[:5]) + (", ..." if len(floating) > 5 else "")
        causes.append(f"{len(floating)} compute op(s) still run in FP32: {names}.")
    unfused = quant.get("unfused_qdq") or 0
    if unfused:
        causes.append(
            f"{unfused} QuantizeLinear/DequantizeLinear node(s) that ONNX Runtime could not "
            "fuse into INT8 ops convert tensors back and forth at run time."
        )
    return causes


def _accuracy_problem(final: Row, base: Row, threshold: float) -> str | None:
    if final.accuracy is None or base.accuracy is None:
        return None
    drop = base.accuracy - final.accuracy
    if drop <= threshold:
        return None
    return (
        f"Accuracy fell by {drop * 100:.2f} points ({base.accuracy:.4f} -> "
        f"{final.accuracy:.4f}), more than the {threshold * 100:.2f}-point threshold."
    )


def _accuracy_causes(rows: Sequence[Row], threshold: float) -> list[str]:
    """Each stage that lost more than ``threshold``, and always the one that lost the most,
    with what to try there."""
    steps = [r for r in rows if r.name != "baseline" and r.accuracy is not None]
    previous = find_row(rows, "baseline", "torch")
    drops = []
    for row in steps:
        if previous is not None and previous.accuracy is not None:
            drops.append((previous.accuracy - row.accuracy, previous, row))
        previous = row
    worst = max(drops, key=lambda d: d[0], default=None)
    causes = []
    for drop, before, row in drops:
        most = worst is not None and row is worst[2] and drop > 0
        if drop > threshold or most:
            causes.append(
                f"{row.name} lost {drop * 100:.2f} points "
                f"({before.accuracy:.4f} -> {row.accuracy:.4f})"
                f"{', the most of any stage' if most else ''}. {_advice(row, rows)}"
            )
    return causes


def _advice(row: Row, rows: Sequence[Row]) -> str:
    step = row.name
    stage = step.rsplit("_", 1)[0] if step[-1].isdigit() else step
    if stage == "structured_pruning":
        return _pruning_advice(row, rows)
    if stage == "sparsity_training":
        alpha = (row.details.get("sparsity") or {}).get("alpha", 0.0)
        teacher = (
            "Give it more epochs (the planned channels go in the first quarter, the rest "
            "recovers with them at zero)"
            if alpha
            else "Let it learn from the original model (sparsity_training.alpha: 0.7)"
        )
        return (
            f"{teacher}, try optimizer: probe (SGD can throw a network trained with Adam "
            f"off) or a lower lr, or {_less_pruning(rows)}."
        )
    return {
        "distillation": "Distillation did not recover it: more epochs, optimizer: probe (SGD "
        "can throw a network trained with Adam off), or a lower lr.",
        "int8_quantization": "Try int8_quantization.method: percentile or entropy (minmax is "
        "sensitive to outlier activations), or more calibration_samples.",
    }.get(stage, "")


def _pruning_advice(row: Row, rows: Sequence[Row]) -> str:
    """What to try when pruning lost accuracy, given what ran before it and its options."""
    pruning = row.details.get("pruning") or {}
    before = list(rows[: rows.index(row)]) if row in rows else list(rows)
    zeroed = pruning.get("removed_at_zero_fraction")
    if not any(r.name.startswith("sparsity_training") for r in before):
        first = (
            "Put sparsity_training before it (it drives the channels pruning removes to zero first)"
        )
    elif zeroed is not None and zeroed < 0.99:
        first = (
            f"sparsity_training before it zeroed only {zeroed:.0%} of the channels pruning "
            "removed: give it more epochs"
        )
    else:
        first = "Give sparsity_training before it more epochs"
    return f"{first}, {_less_pruning([row])}, or follow pruning with (longer) distillation."


def _less_pruning(rows: Sequence[Row]) -> str:
    """How to ask for less pruning: relax the target when the pruning row had one."""
    for row in rows:
        target = (row.details.get("pruning") or {}).get("target")
        if target:
            return f"relax the pruning target ({target['option']} {target['value']:g})"
    return "lower structured_pruning.ratio"
