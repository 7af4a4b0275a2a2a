"""The one torch -> ONNX export path, and the parity check that follows every export."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from .._io import atomic_path
from ..errors import ExportError, ModelError, first_line
from ..inputs import Inputs, Positional, input_names, rows
from ..models.layers import call_naming_layer
from ..models.model_io import ModelIO
from .measure import ort_predictor, ort_session, torch_predictor, torch_threads

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduced torch on the check inputs."""

    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    samples: int

    def to_dict(self) -> dict[str, float]:
        """Plain data for the report."""
        return dataclasses.asdict(self)


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: str | Path,
    *,
    check_inputs: Inputs | None = None,
    opset: int = DEFAULT_OPSET,
    threads: int = 1,
    atol: float = 1e-4,
    rtol: float = 2e-3,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Parity:
    """Export ``model`` (on the CPU, eval mode) to ``path`` and check it in ONNX Runtime.

    The file has one input ``input`` for a tensor example, or one input per key of a
    mapping example (see `compressor.inputs`), each with a dynamic batch axis; 2-D integer
    inputs (token ids, attention masks) also get a dynamic ``sequence`` axis. It is written
    only if ONNX Runtime's output matches torch's on ``check_inputs`` (default: the example):
    see `check_parity` (``labels``: the classes an output predicts, e.g. `ModelIO.labels`).

    Raises:
        ExportError: the exporter failed (naming the layer or op) or the outputs differ.
    """
    model = model.cpu().eval()
    path = Path(path)
    names = input_names(example_input)
    if isinstance(example_input, torch.Tensor):
        traced, args = model, (example_input.cpu(),)
    else:
        traced = Positional(model, names)
        args = tuple(example_input[name].cpu() for name in names)
    with atomic_path(path) as tmp:

        def export() -> None:
            with warnings.catch_warnings(), _mha_fast_path_off():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    traced,
                    args,
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=["output"],
                    dynamic_axes={**_dynamic_axes(example_input), "output": {0: "batch"}},
                    do_constant_folding=True,
                )

        try:
            call_naming_layer(model, export, "ONNX export")
        except ModelError as exc:
            raise ExportError(str(exc)) from exc
        except Exception as exc:
            msg = f"ONNX export of {type(model).__name__} failed: {first_line(exc)}"
            raise ExportError(msg) from exc
        inputs = example_input if check_inputs is None else check_inputs
        parity = check_parity(
            model, tmp, inputs, threads=threads, atol=atol, rtol=rtol, labels=labels
        )
    return parity


def _dynamic_axes(example_input: Inputs) -> dict[str, dict[int, str]]:
    if isinstance(example_input, torch.Tensor):
        return {"input": {0: "batch"}}
    axes = {}
    for name, tensor in example_input.items():
        sequence = tensor.dim() == 2 and not tensor.is_floating_point()
        axes[name] = {0: "batch", 1: "sequence"} if sequence else {0: "batch"}
    return axes


@contextmanager
def _mha_fast_path_off() -> Iterator[None]:
    """Turn off the eval-mode fast path of ``nn.MultiheadAttention`` for the export.

    With no parameter requiring grad (a frozen or inference-only model), eval mode runs
    ``aten::_native_multi_head_attention``, which the ONNX exporter cannot export; the
    regular path computes the same attention from exportable ops.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    inputs: Inputs,
    *,
    threads: int = 1,
    atol: float = 1e-4,
    rtol: float = 2e-3,
    min_agreement: float = 0.99,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Parity:
    """Compare ONNX Runtime's output on ``inputs`` with torch's.

    Top-1 agreement compares the classes ``labels(output)`` gives (default: argmax over
    axis 1, per sample or per pixel; a detector's `ModelIO.labels` is per anchor).

    Raises:
        ExportError: shapes differ, the max abs difference exceeds ``atol + rtol * max|torch|``
            or top-1 agreement is below ``min_agreement``.
    """
    with torch_threads(threads):
        ref = torch_predictor(model)(inputs).float()
    try:
        out = ort_predictor(ort_session(onnx_path, threads))(inputs).float()
    except Exception as exc:
        msg = f"ONNX Runtime cannot run the exported model: {first_line(exc)}"
        raise ExportError(msg) from exc
    if out.shape != ref.shape:
        msg = f"ONNX output shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}"
        raise ExportError(msg)
    diff = float((out - ref).abs().max()) if ref.numel() else 0.0
    tolerance = atol + rtol * float(ref.abs().max()) if ref.numel() else atol
    agreement = 1.0
    if ref.dim() >= 2 and ref.shape[0] > 0:
        classes = labels or ModelIO().labels
        agreement = float((classes(out) == classes(ref)).float().mean())
    parity = Parity(diff, tolerance, agreement, rows(inputs))
    if diff > tolerance or agreement < min_agreement:
        msg = (
            f"ONNX Runtime disagrees with torch on the exported model: max abs diff {diff:.3g} "
            f"(allowed {tolerance:.3g}), top-1 agreement {agreement:.3f} "
            f"(required {min_agreement}) over {parity.samples} samples"
        )
        raise ExportError(msg)
    return parity


def nodes_of_modules(model: onnx.ModelProto, modules: Sequence[str]) -> list[str]:
    """The names of the nodes of an exported ``model`` that torch modules ``modules``
    (dotted names, e.g. ``head.classification_head.module_list.0.1``) or their children
    computed, read from the exporter's scope names (``/layer1/layer1.0/conv1/Conv``)."""
    found = []
    for node in model.graph.node:
        module = scope_module(node.name)
        if any(module == m or module.startswith(f"{m}.") for m in modules):
            found.append(node.name)
    return found


def tail_nodes(model: onnx.ModelProto, modules: Sequence[str]) -> list[str]:
    """`nodes_of_modules` and every node after them (what reads their outputs, on to the
    model's outputs): a detector's heads and the reshapes and concatenation after them."""
    chosen = set(nodes_of_modules(model, modules))
    tensors = {o for n in model.graph.node if n.name in chosen for o in n.output}
    for node in model.graph.node:  # a graph's nodes are in topological order
        if node.name not in chosen and any(i in tensors for i in node.input):
            chosen.add(node.name)
            tensors.update(node.output)
    return [n.name for n in model.graph.node if n.name in chosen]


def scope_module(node_name: str) -> str:
    """The dotted torch module name of an exported node's scope (``""`` for none).

    The scope lists the modules that ran, each by its name from its last non-numeric part
    (``layer1``, ``layer1.0``, ``conv1``); a part that repeats the end of the name so far
    continues it (``layer1`` + ``layer1.0`` is ``layer1.0``).
    """
    atoms: list[str] = []
    for part in node_name.split("/")[1:-1]:
        new = part.split(".")
        overlap = next(
            (k for k in range(min(len(atoms), len(new) - 1), 0, -1) if atoms[-k:] == new[:k]),
            0,
        )
        atoms += new[overlap:]
    return ".".join(atoms)
