"""INT8 and accuracy: which nodes lose the most in INT8, and reverting them to meet a budget.

`int8_sensitivity` reverts each compute node of a QDQ INT8 file to FP32 on its own (weights
and activation inputs, `keep_fp32` with ``float_inputs``) and measures how much closer the
file's outputs come to the FP32 model's on a sample of the eval data. `revert_to_budget`
reverts the most sensitive nodes, trying the fewest first, until the file's accuracy on
the eval data is within the budget.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch

from ..data import as_data_spec
from ..inputs import Inputs, rows, take
from ..runtime.measure import default_threads, onnx_predictor, sample_batch
from .placement import keep_fp32

if TYPE_CHECKING:
    from ..runtime.measure import Predict
    from ..stage import RunContext

_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CHUNK = 32  # samples per ONNX Runtime call: bounded memory on big models
SHOWN = 20
"""Nodes of the ranking kept in the report (the whole ranking is in the function's result)."""


def int8_sensitivity(
    int8_path: str | Path,
    fp32_path: str | Path,
    data: Any,
    *,
    samples: int = 256,
    threads: int | None = None,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """How much of the INT8 file's error each compute node causes, most first.

    Each quantized compute node (Conv, ConvTranspose, Gemm, MatMul) of ``int8_path`` is
    reverted to FP32 alone, weights and activation inputs, and the file's outputs on
    ``samples`` inputs of ``data`` are compared with those of ``fp32_path`` (the FP32 model
    that was quantized).

    Args:
        int8_path: a QDQ INT8 ONNX file, as `Int8Quantization` writes.
        fp32_path: the FP32 ONNX file it was quantized from (node names match).
        data: a DataLoader of ``(inputs, targets)`` or a `DataSpec`.
        samples: inputs compared per node.
        threads: ONNX Runtime threads (default: all cores).
        exclude: nodes not to try (already in FP32).

    Returns:
        ``error_int8`` (mean absolute difference of the INT8 file's outputs from FP32's),
        ``nodes`` (per node: ``node``, ``op_type``, ``error`` with it in FP32, ``gain`` the
        share of ``error_int8`` that removes, highest gain first), ``samples``, ``seconds``.
    """
    start = time.perf_counter()
    spec = as_data_spec(data, "data")
    threads = threads or default_threads()
    quantized, source = onnx.load(str(int8_path)), onnx.load(str(fp32_path))
    inputs = sample_batch(spec, samples)
    reference = _outputs(onnx_predictor(fp32_path, threads), inputs)
    base = _error(_outputs(onnx_predictor(int8_path, threads), inputs), reference)
    found = []
    with tempfile.TemporaryDirectory(prefix="compressor-sensitivity-") as tmp:
        trial = Path(tmp) / "trial.onnx"
        for node in quantized_nodes(quantized, source):
            if node.name in exclude:
                continue
            onnx.save(keep_fp32(quantized, source, [node.name], float_inputs=True), str(trial))
            error = _error(_outputs(onnx_predictor(trial, threads), inputs), reference)
            gain = (base - error) / base if base > 0 else 0.0
            found.append(
                {"node": node.name, "op_type": node.op_type, "error": error, "gain": round(gain, 4)}
            )
    found.sort(key=lambda n: -n["gain"])
    return {
        "error_int8": base,
        "nodes": found,
        "samples": rows(inputs),
        "seconds": round(time.perf_counter() - start, 2),
    }


def quantized_nodes(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The compute nodes of ``quantized`` that read a dequantized tensor and exist in ``fp32``."""
    names = {n.name for n in fp32.graph.node if n.op_type in _COMPUTE}
    dequantized = {
        out for n in quantized.graph.node if n.op_type == "DequantizeLinear" for out in n.output
    }
    return [
        n
        for n in quantized.graph.node
        if n.op_type in _COMPUTE and n.name in names and any(i in dequantized for i in n.input)
    ]


def revert_to_budget(
    quantized: Path,
    fp32: Path,
    ctx: RunContext,
    min_accuracy: float,
    *,
    samples: int,
    exclude: Collection[str] = (),
    fp32_accuracy: float | None = None,
    int8_accuracy: float | None = None,
    in_prefix: Collection[str] = (),
) -> tuple[Path, dict[str, Any]]:
    """Revert the most INT8-sensitive nodes to FP32 until accuracy >= ``min_accuracy``.

    Accuracy is ``ctx.eval_fn`` over ``ctx.eval_data`` in ONNX Runtime. Two orders are tried
    side by side: the nodes by their own INT8 error ("ranking"), and the graph's first
    compute nodes with every op between them ("prefix", `graph_prefixes`). Counts of
    reverted compute nodes are tried 1, 2, 4, ... until one meets the budget, then halved
    back to the fewest that do (`_fewest`). When none does (all reverted included), the
    most accurate file is kept. When the FP32 model is itself under ``min_accuracy``, no
    node is reverted: the accuracy was lost before INT8, and reverting could not win it
    back. ``fp32_accuracy``, ``int8_accuracy``: ``fp32``'s and ``quantized``'s, when the
    caller has measured them already.
    ``exclude``: nodes already in FP32, not ranked; those also in ``in_prefix`` (FP32
    placement's, which still read quantized inputs) are reverted again with the prefixes
    they fall in, so that they read float inputs too.

    Returns:
        The file to ship and what was done: ``min_accuracy``, ``fp32_accuracy``,
        ``int8_accuracy``, ``met``, ``fp32_nodes`` (reverted, most sensitive first),
        ``fp32_producers`` (nodes that run in FP32 because a reverted node reads their float
        output; see `float_producers`),
        ``trials`` (nodes reverted and the accuracy), ``sensitivity`` (the top of the
        ranking), ``seconds``.
    """
    start = time.perf_counter()

    def accuracy(path: Path) -> float:
        return round(float(ctx.eval_fn(onnx_predictor(path, ctx.threads), ctx.eval_data)), 6)

    info: dict[str, Any] = {
        "min_accuracy": round(min_accuracy, 6),
        "fp32_accuracy": accuracy(fp32) if fp32_accuracy is None else round(fp32_accuracy, 6),
        "int8_accuracy": accuracy(quantized) if int8_accuracy is None else round(int8_accuracy, 6),
        "fp32_nodes": [],
        "trials": [],
    }
    info["met"] = info["int8_accuracy"] >= min_accuracy
    if info["met"] or info["fp32_accuracy"] < min_accuracy:  # nothing INT8 can do about it
        return quantized, {**info, "seconds": round(time.perf_counter() - start, 2)}
    ctx.log(f"{ctx.step}: INT8 is under the accuracy budget; ranking nodes by INT8 error")
    sensitivity = int8_sensitivity(
        quantized, fp32, ctx.eval_data, samples=samples, threads=ctx.threads, exclude=exclude
    )
    ranking = [n["node"] for n in sensitivity["nodes"]]
    info["sensitivity"] = {**sensitivity, "nodes": sensitivity["nodes"][:SHOWN]}
    model, source = onnx.load(str(quantized)), onnx.load(str(fp32))
    prefixes = graph_prefixes(model, source, set(exclude) - set(in_prefix))
    # (order, count) -> (accuracy, file); order "ranking" or "prefix"
    results: dict[tuple[str, int], tuple[float, Path]] = {
        ("ranking", 0): (info["int8_accuracy"], quantized)
    }

    def reverted(order: str, count: int) -> list[str]:
        return ranking[:count] if order == "ranking" else prefixes[count - 1]

    def trial(order: str, count: int) -> bool:
        path = quantized.with_name(f"budget_{order}_{count}.onnx")
        onnx.save(keep_fp32(model, source, reverted(order, count), float_inputs=True), str(path))
        results[order, count] = (accuracy(path), path)
        info["trials"].append(
            {"order": order, "fp32_nodes": count, "accuracy": results[order, count][0]}
        )
        ctx.log(
            f"{ctx.step}: {count} compute node(s) in FP32 ({order}): "
            f"accuracy {results[order, count][0]:.4f}"
        )
        return results[order, count][0] >= min_accuracy

    # Errors that grow layer by layer (a constant background's rounding, amplified by
    # the convolutions after it) show in no single node: the graph's first layers together
    # are tried beside the ranking.
    found = _fewest(
        {
            "ranking": (lambda c: trial("ranking", c), len(ranking)),
            "prefix": (lambda c: trial("prefix", c), len(prefixes)),
        }
    )
    if found:
        order, count = found
    else:  # nothing met it: the most accurate, fewest nodes on a tie
        order, count = max(results, key=lambda k: (results[k][0], -k[1]))
    path = results[order, count][1]
    info["met"] = results[order, count][0] >= min_accuracy
    info["order"] = order
    names = set(reverted(order, count))
    info["fp32_nodes"] = (
        ranking[:count]
        if order == "ranking"
        else [n.name for n in model.graph.node if n.name in names and n.op_type in _COMPUTE]
    )
    info["fp32_other_nodes"] = sorted(
        n.name for n in model.graph.node if n.name in names and n.op_type not in _COMPUTE
    )
    if count:
        info["fp32_producers"] = float_producers(onnx.load(str(path)), info["fp32_nodes"])
    info["accuracy"] = results[order, count][0]
    info["seconds"] = round(time.perf_counter() - start, 2)
    return path, info


def _fewest(orders: dict[str, tuple[Callable[[int], bool], int]]) -> tuple[str, int] | None:
    """The order, and its smallest count in 1..limit, for which ``meets`` holds (assumed to
    keep holding for larger counts), given ``{order: (meets, limit)}``; the earlier order
    on a tie, None when every limit fails.

    The orders are tried side by side at 1, 2, 4, ... until one meets, then halved back: an
    order that failed at a count cannot beat one that met there, so it is not tried further.
    """
    alive = {name: spec for name, spec in orders.items() if spec[1] > 0}
    low, count, met = 0, 1, []  # every alive order failed at `low`
    while alive and not met:
        for name, (meets, limit) in list(alive.items()):
            tried = min(count, limit)
            if meets(tried):
                met.append((name, tried))
            elif tried == limit:
                del alive[name]
        if not met:
            low, count = count, count * 2
    best: tuple[str, int] | None = None
    for name, high in met:
        meets = orders[name][0]
        if best is not None:  # only fewer than the best so far can win
            if best[1] - 1 <= low or not meets(best[1] - 1):
                continue
            high = best[1] - 1
        bottom = low
        while high - bottom > 1:
            middle = (bottom + high) // 2
            if meets(middle):
                high = middle
            else:
                bottom = middle
        best = (name, high)
    return best


def graph_prefixes(
    quantized: onnx.ModelProto, fp32: onnx.ModelProto, exclude: Collection[str] = ()
) -> list[list[str]]:
    """The graph's first layers, for reverting together: entry ``k - 1`` names every node of
    ``quantized`` that ``fp32`` computes before its ``k + 1``-th compute node (so ``k``
    compute nodes, with the activations and other ops between them), in graph order.

    Nodes the quantizer dropped (a Relu folded into a Quantize), unnamed nodes and
    ``exclude`` (already FP32) are left out.
    """
    have = {n.name: n.op_type for n in quantized.graph.node}
    found: list[list[str]] = []
    current: list[str] = []
    computes = 0  # compute nodes in ``current``
    for node in fp32.graph.node:
        if not node.name or have.get(node.name) != node.op_type or node.name in exclude:
            continue
        if node.op_type in _COMPUTE:
            if computes:
                found.append(list(current))
            computes += 1
        current.append(node.name)
    if computes:
        found.append(current)
    return found


def float_producers(model: onnx.ModelProto, names: Collection[str]) -> list[str]:
    """Compute nodes not in ``names`` whose output a node in ``names`` reads as float.

    An INT8 kernel writes a quantized output; a node reverted with float inputs reads its
    producer's float output, so ONNX Runtime runs that producer in FP32 too.
    """
    produced_by = {out: n for n in model.graph.node for out in n.output}
    found: list[str] = []
    for node in (n for n in model.graph.node if n.name in names):
        for tensor in node.input:
            producer = produced_by.get(tensor)
            if producer is not None and producer.op_type in ("Relu", "Clip"):
                producer = produced_by.get(producer.input[0])
            if (
                producer is not None
                and producer.op_type in _COMPUTE
                and producer.name not in names
                and producer.name not in found
            ):
                found.append(producer.name)
    return found


def _outputs(predict: Predict, inputs: Inputs) -> torch.Tensor:
    parts = [predict(take(inputs, i, i + _CHUNK)).float() for i in range(0, rows(inputs), _CHUNK)]
    return torch.cat(parts)


def _error(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return round(float((outputs - reference).abs().mean()), 7)
