"""ONNX graph edits around quantization: pre-processing, single-file saving, HardSigmoid
written as Mul/Add/Clip, node names, and what ONNX Runtime's optimized graph runs in INT8."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..errors import ModelError, first_line
from ..runtime.measure import (
    ort_session,
)

if TYPE_CHECKING:
    pass


_INT8_COMPUTE = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QGemm",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}


_ONE_FILE_LIMIT = 2**31 - 1  # protobuf's limit on one serialised message


_FLOAT_COMPUTE = {
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
}


def needs_external_data(path: str | Path) -> bool:
    """True when the ONNX model at ``path`` is too big for one file (over 2 GB).

    Such a model keeps its weights in files beside it, and every tool that writes a
    version of it (pre-processing, calibration, quantization) has to do the same.
    """
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def save_single_file(source: Path, out: Path, external: bool) -> None:
    """Write the ONNX model at ``source`` (its weights beside it if ``external``) as one file.

    Raises:
        ModelError: the model is over ONNX's 2 GB single-file limit even in INT8.
    """
    if not external:
        shutil.copyfile(source, out)
        return
    model = onnx.load(str(source))  # with the weights kept beside it
    if model.ByteSize() >= _ONE_FILE_LIMIT:
        msg = (
            f"the INT8 model is {model.ByteSize() / 1e9:.1f} GB, over ONNX's 2 GB limit for "
            "one file; prune it first (structured_pruning) to make it smaller"
        )
        raise ModelError(msg)
    onnx.save(model, str(out))


def pre_process(fp32: Path, out: Path) -> Path:
    """``fp32`` through ONNX Runtime's quant_pre_process as the stage runs it (into ``out``,
    or ``fp32`` itself when it cannot run): the file to quantize."""
    return _pre_process(fp32, out, False)[0]


def _pre_process(fp32: Path, out: Path, external: bool) -> tuple[Path, str, str | None]:
    """Run ONNX Runtime's quant_pre_process: (the file to quantize, how, the error if none ran).

    Its symbolic shape inference fails on some graphs (every torchvision ViT: a Reshape
    whose shape it cannot follow), so that is retried without it: the graph optimisation
    still runs (on ViT-B/16: 198 instead of 294 unfused Q/DQ, about the same speed).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    error = None
    for how, skip_symbolic in (("full", False), ("without symbolic shape inference", True)):
        try:
            with warnings.catch_warnings(), _scratch_cwd(str(out.parent)):
                warnings.simplefilter("ignore")
                quant_pre_process(
                    str(fp32),
                    str(out),
                    skip_symbolic_shape=skip_symbolic,
                    save_as_external_data=external,
                )
        except Exception as exc:
            error = error or first_line(exc)
            continue
        if not external:
            name_nodes(out)
            split_hard_sigmoid(out)
        return out, how, None
    return fp32, "failed", error


def split_hard_sigmoid(path: Path) -> int:
    """Write every HardSigmoid of the ONNX file ``path`` as ``Clip(x * alpha + beta, 0, 1)``
    (Mul, Add, Clip), in place; returns how many.

    ONNX Runtime has no INT8 HardSigmoid: in a QDQ file each one (MobileNetV3's HardSwish
    is ``x * HardSigmoid(x)`` after pre-processing, its squeeze-excite gates are
    HardSigmoid) runs in float between a Dequantize and a Quantize. Mul and Add have INT8
    kernels and the Clip folds into the Quantize after it, so the whole activation stays
    INT8 (the same values in FP32).
    """
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    if not any(n.op_type == "HardSigmoid" and n.domain in ("", "ai.onnx") for n in graph.node):
        return 0
    taken = {i.name for i in graph.initializer} | {n for node in graph.node for n in node.output}

    def constant(value: float, stem: str) -> str:
        name = stem
        while name in taken:
            name += "_"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        found = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = float(found.get("alpha", 0.2)), float(found.get("beta", 0.5))
        stem = node.name or f"hard_sigmoid_{count}"
        scaled, shifted = f"{stem}/scaled", f"{stem}/shifted"
        nodes += [
            helper.make_node(
                "Mul", [node.input[0], constant(alpha, f"{stem}/alpha")], [scaled], f"{stem}/Mul"
            ),
            helper.make_node(
                "Add", [scaled, constant(beta, f"{stem}/beta")], [shifted], f"{stem}/Add"
            ),
            helper.make_node(
                "Clip",
                [shifted, constant(0.0, f"{stem}/min"), constant(1.0, f"{stem}/max")],
                [node.output[0]],
                f"{stem}/Clip",
            ),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return count


def name_nodes(path: Path) -> None:
    """Give every unnamed node of the ONNX file ``path`` a name of its own, in place.

    quant_pre_process inlines ONNX functions (the exporter writes HardSwish as one) into
    unnamed nodes, and nodes are kept in FP32 or reverted by name.
    """
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node}
    if "" not in taken:
        return
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"/unnamed/{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    onnx.save(model, str(path))


@contextlib.contextmanager
def _scratch_cwd(path: str) -> Iterator[None]:
    """Run the block in ``path``.

    When its symbolic shape inference gives up, ONNX Runtime's quant_pre_process saves a
    debug model (sym_shape_infer_temp.onnx and UUID-named .data files) into the working
    directory, which is the user's. Only for blocks that get absolute paths and read no
    user data (a data set given by a relative path would no longer be found).
    """
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def inspect_int8_graph(
    path: str | Path,
    threads: int,
    optimized_path: str | Path,
    kept_fp32: Sequence[str] = (),
) -> dict[str, Any]:
    """Count INT8 and FP32 compute ops in the graph ONNX Runtime actually runs (after fusion).

    ``unfused_qdq`` counts the QuantizeLinear/DequantizeLinear nodes left inside the graph:
    a fully fused graph keeps only the one that quantizes the input and the one that
    dequantizes the output. Ops of the nodes in ``kept_fp32`` (kept in FP32 on purpose)
    are listed as ``fp32_by_choice``, not among ``float_compute_ops``.
    """
    ort_session(path, threads, optimized_path=optimized_path)
    # ONNX Runtime renames some nodes it rewrites after their output (``..._nchwc``)
    written = onnx.load(str(path), load_external_data=False).graph
    keys = {k for k in kept_fp32 if k}
    keys |= {o for n in written.node if n.name in keys for o in n.output if o}
    graph = onnx.load(str(optimized_path)).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    int8 = [n for n in graph.node if n.op_type in _INT8_COMPUTE]
    floating = [
        n
        for n in graph.node
        if n.op_type in _FLOAT_COMPUTE
        or (n.op_type.startswith("Nchwc") and not n.op_type.startswith("NchwcReorder"))
    ]
    chosen = [
        n for n in floating if any(k in n.name for k in keys) or any(o in keys for o in n.output)
    ]
    floating = [n for n in floating if n not in chosen]
    unfused = [
        n
        for n in graph.node
        if (n.op_type == "QuantizeLinear" and n.input[0] not in inputs)
        or (n.op_type == "DequantizeLinear" and n.output[0] not in outputs)
    ]
    return {
        "int8_compute_ops": len(int8),
        "float_compute_ops": [f"{n.name or '?'} ({n.op_type})" for n in floating],
        "fp32_by_choice": [f"{n.name or '?'} ({n.op_type})" for n in chosen],
        "unfused_qdq": len(unfused),
    }
