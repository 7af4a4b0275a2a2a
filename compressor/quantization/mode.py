"""Static (QDQ, calibrated) or dynamic INT8: which one a model gets.

Static INT8 fixes every activation's scale from calibration data and is the fast kind for
convolutions. Transformers are different: their MatMuls read activations whose ranges vary
from token to token, and ONNX Runtime's static QDQ MatMuls leave dequantize/quantize pairs
that cost what INT8 saves. Dynamic INT8 quantizes each MatMul's input at run time
(``DynamicQuantizeMatMul``, ``MatMulInteger``) with weights stored in INT8, and is often
about twice as fast there. `choose_mode` measures both files side by side, at batch 1 in
ONNX Runtime, and keeps the faster one unless it is further from FP32.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ..inputs import rows
from ..runtime.measure import ort_predictor, ort_session, sample_batch, timed_runs

if TYPE_CHECKING:
    from ..stage import RunContext

MODES = ("auto", "static", "dynamic")
DYNAMIC_OPS = ["MatMul", "Gemm"]  # ONNX Runtime's ConvInteger is slower than FP32 convs
_CONV_OPS = {"Conv", "ConvTranspose"}
SAMPLES = 256  # eval inputs the outputs are compared on
MIN_GAIN = 1.05  # dynamic must be at least this much faster than static
AGREEMENT_MARGIN = 0.005  # a file agreeing with FP32's top-1 this much more often is closer
ERROR_MARGIN = 1.5  # or, without a class axis, this many times nearer FP32's outputs


def has_convolutions(path: str | Path) -> bool:
    """Whether the ONNX file runs a convolution (then dynamic INT8 is not tried)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in _CONV_OPS for node in graph.node)


def activation_matmuls(path: str | Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q.k and weights.v): dynamic INT8
    leaves them in FP32, by design."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.name and not any(i in constants for i in n.input)
    ]


def quantize_dynamic_file(
    source: Path, out: Path, *, per_channel: bool, reduce_range: bool, external: bool
) -> None:
    """Dynamic INT8 of ``source``'s MatMul and Gemm nodes (INT8 weights) into ``out``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(source),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=DYNAMIC_OPS,
            use_external_data_format=external,
        )


def choose_mode(fp32: Path, static: Path, dynamic: Path, ctx: RunContext) -> dict[str, Any]:
    """Time the FP32, static and dynamic files at batch 1, and compare their outputs with
    FP32's on up to `SAMPLES` eval inputs.

    The file clearly closer to FP32 is ``chosen``: top-1 agreement with FP32 (per sample,
    pixel or anchor, `ModelIO.labels`) more than `AGREEMENT_MARGIN` higher, or, for outputs
    without a class axis, a mean absolute difference more than `ERROR_MARGIN` times smaller.
    When neither is, ``dynamic`` if it is at least `MIN_GAIN` times faster than static,
    else ``static``. (A timing alone never picks a file that wrecks accuracy, as static QDQ
    does to BERT.)
    """
    x1 = sample_batch(ctx.eval_data, 1)
    xs = sample_batch(ctx.eval_data, SAMPLES)
    predictors = {
        name: ort_predictor(ort_session(path, ctx.threads))
        for name, path in (("fp32", fp32), ("static", static), ("dynamic", dynamic))
    }
    reference = predictors["fp32"](xs).float()
    # class scores to compare by the class they pick (`ModelIO.labels`: per sample or
    # pixel, per anchor for a detector), else a regression-like output
    classes = ctx.io.detection is not None or (reference.dim() >= 2 and reference.shape[1] > 1)
    info: dict[str, Any] = {}
    for name, predict in predictors.items():
        p50 = timed_runs(lambda p=predict: p(x1)).median
        entry: dict[str, Any] = {"p50_ms": round(p50 * 1e3, 4)}
        if name != "fp32":
            out = predict(xs).float()
            entry["mean_abs_diff"] = round(float((out - reference).abs().mean()), 6)
            if classes:
                same = ctx.io.labels(out) == ctx.io.labels(reference)
                entry["top1_agreement"] = round(float(same.float().mean()), 6)
        info[name] = entry
    static_info, dynamic_info = info["static"], info["dynamic"]
    faster = static_info["p50_ms"] >= MIN_GAIN * dynamic_info["p50_ms"]
    if classes:
        margin = dynamic_info["top1_agreement"] - static_info["top1_agreement"]
        dynamic_closer, static_closer = margin > AGREEMENT_MARGIN, -margin > AGREEMENT_MARGIN
    else:
        errors = dynamic_info["mean_abs_diff"], static_info["mean_abs_diff"]
        dynamic_closer = errors[0] * ERROR_MARGIN < errors[1]
        static_closer = errors[0] > ERROR_MARGIN * errors[1]
    if dynamic_closer or static_closer:
        chosen = "dynamic" if dynamic_closer else "static"
        why = f"{'static' if dynamic_closer else 'dynamic'} is further from FP32"
    else:
        chosen = "dynamic" if faster else "static"
        why = "dynamic is faster and as close to FP32" if faster else "dynamic is not faster"
    return {"chosen": chosen, "reason": why, "samples": rows(xs), **info}
