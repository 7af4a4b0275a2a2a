"""Which compute nodes of a QDQ INT8 model run in INT8: reverting some to FP32.

`keep_fp32` edits a quantized QDQ model so that chosen nodes compute in float again with
their original float weights (from the FP32 model that was quantized), while every other
node stays as it was: no second calibration. `candidates` lists the nodes worth trying, and
the INT8 stage keeps a node in FP32 only when the whole model measures faster that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ..runtime.measure import Predict, interleaved_runs, onnx_predictor, sample_batch

if TYPE_CHECKING:
    from ..stage import RunContext

_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MARGIN = 0.03
"""A node stays FP32 only if the whole file gets at least this much faster (timing noise)."""
ROUNDS = 3


@dataclass(frozen=True)
class Candidate:
    """A compute node that INT8 kernels handle poorly, and why it is suspected."""

    node: str
    reason: str


def place_fp32(
    quantized: Path, fp32: Path, ctx: RunContext, limit: int
) -> tuple[Path, dict[str, Any]]:
    """Revert the `candidates` of ``fp32`` to FP32 one by one where that measures faster.

    Each trial file is timed against the current one at batch 1 in every runtime of the
    run, interleaved over `ROUNDS` rounds; it is kept when the fastest runtime's p50 drops
    by at least `MARGIN`, its accuracy on the eval data (in ONNX Runtime) does not fall,
    and its outputs on eval inputs are no further from the FP32 model's than the current
    file's (a node in FP32 should only bring them closer).
    Returns the file to ship and what was tried (``runtimes``, ``tried``, ``fp32_nodes``,
    ``notes``).
    """
    source, model = onnx.load(str(fp32)), onnx.load(str(quantized))
    found = candidates(source, limit)
    result: dict[str, Any] = {"runtimes": list(ctx.runtimes), "tried": [], "fp32_nodes": []}
    notes: list[str] = []
    if found:
        x = sample_batch(ctx.eval_data, 1)
        check = sample_batch(ctx.eval_data, 64)
        reference = onnx_predictor(fp32, ctx.threads)(check)
        current_path = quantized
        current = _predictors(current_path, ctx)
        current_accuracy: float | None = None  # a pass over the eval data: only when needed
        current_error = _error(current["onnxruntime"], check, reference)
        for index, candidate in enumerate(found):
            trial_path = quantized.with_name(f"placement_{index}.onnx")
            nodes = [*result["fp32_nodes"], candidate.node]
            onnx.save(keep_fp32(model, source, nodes), str(trial_path))
            trial = _predictors(trial_path, ctx)
            times = _interleaved(current, trial, x)
            before = min(t["int8"] for t in times.values())
            after = min(t["fp32"] for t in times.values())
            accuracy = error = None
            if after <= before * (1 - MARGIN):
                if current_accuracy is None:
                    current_accuracy = float(ctx.eval_fn(current["onnxruntime"], ctx.eval_data))
                accuracy = float(ctx.eval_fn(trial["onnxruntime"], ctx.eval_data))
                error = _error(trial["onnxruntime"], check, reference)
            keep = (
                accuracy is not None
                and error is not None
                and current_accuracy is not None
                and accuracy >= current_accuracy
                and error <= current_error * 1.05 + 1e-6
            )
            result["tried"].append(
                {
                    "node": candidate.node,
                    "reason": candidate.reason,
                    "p50_ms": times,
                    "accuracy": {"int8": current_accuracy, "fp32": accuracy},
                    "error_vs_fp32": {"int8": current_error, "fp32": error},
                    "kept_fp32": keep,
                }
            )
            if keep:
                notes.append(
                    f"{candidate.node} kept in FP32 ({candidate.reason}): the file runs "
                    f"{before:.3f} -> {after:.3f} ms p50 in the fastest runtime"
                )
                result["fp32_nodes"].append(candidate.node)
                current, current_path = trial, trial_path
                current_accuracy, current_error = accuracy, error
        quantized = current_path
    return quantized, {**result, "notes": notes}


def _error(predict: Predict, inputs: Any, reference: Any) -> float:
    """Mean absolute difference of ``predict``'s outputs from the FP32 model's."""
    return round(float((predict(inputs).float() - reference.float()).abs().mean()), 7)


def _predictors(path: Path, ctx: RunContext) -> dict[str, Predict]:
    return {runtime: onnx_predictor(path, ctx.threads, runtime) for runtime in ctx.runtimes}


def _interleaved(
    current: dict[str, Predict], trial: dict[str, Predict], x: object
) -> dict[str, dict[str, float]]:
    """p50 ms of both files in each runtime, timed in alternating rounds."""
    runs = {
        (runtime, key): (lambda p=predictors[runtime]: p(x))
        for runtime in current
        for key, predictors in (("int8", current), ("fp32", trial))
    }
    timings = interleaved_runs(runs, rounds=ROUNDS, min_time_s=0.25)
    return {
        runtime: {key: round(timings[runtime, key].median * 1e3, 4) for key in ("int8", "fp32")}
        for runtime in current
    }


def candidates(fp32: onnx.ModelProto, limit: int) -> list[Candidate]:
    """Compute nodes whose INT8 form is likely slower than FP32, most likely first.

    INT8 convolution kernels pack input channels in fours (VNNI) and blocks of 16 or more;
    a conv with few input channels per group (an image stem on 1-3 channels) or a
    depthwise conv wastes most of each packed instruction, and its Quantize/Dequantize
    work is large next to its few MACs. Measuring decides; this only orders the tries.
    """
    shapes = {t.name: list(t.dims) for t in fp32.graph.initializer}
    found: list[tuple[int, Candidate]] = []
    for node in fp32.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        weight = shapes.get(node.input[1])
        if not weight or len(weight) < 3:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        per_group = weight[1] if node.op_type == "Conv" else weight[0] // max(group, 1)
        if per_group <= 4:
            found.append((0, Candidate(node.name, f"{per_group} input channel(s) per group")))
        elif group > 1 and per_group < 16:
            found.append((1, Candidate(node.name, f"grouped conv, {per_group} channels/group")))
    found.sort(key=lambda item: item[0])
    return [c for _, c in found[:limit]]


def keep_fp32(
    quantized: onnx.ModelProto,
    fp32: onnx.ModelProto,
    names: Iterable[str],
    *,
    float_inputs: bool = False,
) -> onnx.ModelProto:
    """A copy of ``quantized`` in which the nodes ``names`` compute in FP32 again.

    Each such node computes in FP32 with its float weights and bias from ``fp32`` (the model
    that was quantized). The model's own inputs it reads directly. Its other activation
    inputs stay dequantized INT8 tensors unless ``float_inputs``: then it reads the float
    activation before their Quantize too (for accuracy: an activation whose range 8 bits
    cannot hold is no longer rounded). With ``float_inputs``, ``names`` may also hold
    nodes that are not compute nodes (an activation, an Add): they read float inputs too,
    so a run of nodes reverted together passes float tensors from one to the next.
    The quantizer drops a Relu or Clip before a Quantize whose range already clips, so the
    float tensor before an inner Quantize is not always the activation the node computed
    on; such a dropped Relu or Clip is put back for the node, and an input whose float form
    cannot be told stays quantized. Quantize and Dequantize nodes and quantized weights
    nothing reads any more are dropped.

    Raises:
        ValueError: a name is not a compute node of both models (with ``float_inputs``: not
            a node of both, of the same type).
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    float_nodes = {n.name: n for n in fp32.graph.node}
    float_inits = {t.name: t for t in fp32.graph.initializer}
    produced_by = {out: n for n in graph.node for out in n.output}
    have = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    for name in names:
        node = next((n for n in graph.node if n.name == name), None)
        original = float_nodes.get(name)
        if (
            node is None
            or original is None
            or node.op_type != original.op_type
            or (node.op_type not in _COMPUTE and not float_inputs)
        ):
            kind = "node" if float_inputs else "compute node"
            msg = f"no {kind} {name!r} in both the FP32 and the INT8 model"
            raise ValueError(msg)
        for index, tensor in enumerate(node.input):
            source = original.input[index] if index < len(original.input) else ""
            if source in float_inits:  # a weight or bias: the float original
                node.input[index] = _add_float(graph, float_inits[source], have, produced_by)
            elif (source := _float_source(tensor, produced_by)) in inputs:
                node.input[index] = source  # the model's input: skip its Quantize/Dequantize
            elif float_inputs and source != tensor:
                found = _float_activation(graph, fp32, original.input[index], source, produced_by)
                node.input[index] = found or tensor
    _drop_unused(graph)
    return model


_CLIPPING = ("Relu", "Clip")


def _float_activation(
    graph: onnx.GraphProto,
    fp32: onnx.ModelProto,
    wanted: str,
    before_quantize: str,
    produced_by: dict[str, onnx.NodeProto],
) -> str | None:
    """The float tensor of the FP32 model's activation ``wanted``, in the quantized graph.

    ``before_quantize`` is what the Quantize in front of the node reads. It is ``wanted``
    itself when the same node computes it in both graphs; when the quantizer folded a
    Relu or Clip into the Quantize's range, it is that activation's input, and a copy of
    the Relu or Clip is added. None when neither holds.
    """
    float_producer = next((n for n in fp32.graph.node if wanted in n.output), None)
    quant_producer = produced_by.get(before_quantize)
    if float_producer is None or quant_producer is None:
        return None
    if before_quantize == wanted and quant_producer.name == float_producer.name:
        return wanted
    if float_producer.op_type not in _CLIPPING or quant_producer.name == float_producer.name:
        return None
    copy = onnx.NodeProto()
    copy.CopyFrom(float_producer)
    copy.name = f"{float_producer.name}_fp32"
    output = f"{before_quantize}_{float_producer.op_type.lower()}_fp32"
    if output in produced_by:  # another reverted node put it back already
        return output
    del copy.input[:]
    copy.input.extend([before_quantize, *float_producer.input[1:]])
    del copy.output[:]
    copy.output.append(output)
    have = {t.name for t in graph.initializer}
    for bound in float_producer.input[1:]:  # Clip's min and max
        if bound and bound not in have and bound not in produced_by:
            tensor = next((t for t in fp32.graph.initializer if t.name == bound), None)
            if tensor is None:
                return None
            graph.initializer.append(tensor)
    consumer = produced_by[before_quantize]
    position = list(graph.node).index(consumer) + 1
    graph.node.insert(position, copy)
    produced_by[output] = copy
    return output


def _add_float(
    graph: onnx.GraphProto,
    tensor: onnx.TensorProto,
    have: set[str],
    produced_by: dict[str, onnx.NodeProto],
) -> str:
    """Add the float initializer ``tensor`` under a free name (a bias's Dequantize output
    keeps the float name); the name it got."""
    name = tensor.name
    while name in produced_by:
        name += "_fp32"
    if name not in have:  # else: the same float tensor, left unquantized by the quantizer
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = name
        graph.initializer.append(copy)
        have.add(name)
    return name


def _float_source(tensor: str, produced_by: dict[str, onnx.NodeProto]) -> str:
    dq = produced_by.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return tensor
    q = produced_by.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove Q/DQ nodes and initializers that nothing reads (repeatedly, back to front)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for init in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(init)
