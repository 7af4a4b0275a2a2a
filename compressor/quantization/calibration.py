"""Calibration: ONNX Runtime's reader over the training data, its memory budget and the graph's
input names."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..data import DataSpec
from ..inputs import Inputs, feeds, rows, take, to_device

if TYPE_CHECKING:
    pass


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


# An ONNX Runtime calibration run needs memory for about all of the model's activations at
# once (measured on ViT-H/14: 1.9 GB a sample, 1.6x the sum of `activation_bytes`; batches
# of 8 ran a 24 GB machine out of memory), so batches are cut to fit this budget. Min/max
# and histograms over the same samples do not depend on how they are batched.
CALIBRATION_MEMORY = 1 << 30


def activation_bytes(path: str | Path) -> int:
    """Sum of the sizes of every float tensor the ONNX graph at ``path`` computes, per sample.

    From ONNX shape inference with symbolic (batch) dimensions taken as 1; tensors whose
    shape inference cannot tell are left out, so this is a lower bound.
    """
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:  # only their shapes matter, and serialising is slow
        if init.data_type in _FLOAT_TYPES and len(init.raw_data) > 4096:
            init.ClearField("raw_data")
    with contextlib.suppress(Exception):  # no shapes: no estimate, not a failed quantization
        model = onnx.shape_inference.infer_shapes(model)
    total = 0
    for info in [*model.graph.value_info, *model.graph.output]:
        tensor = info.type.tensor_type
        if tensor.elem_type not in _FLOAT_TYPES or not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if any(not d.HasField("dim_value") and not d.HasField("dim_param") for d in dims):
            continue
        size = 2 if tensor.elem_type == onnx.TensorProto.FLOAT16 else 4
        total += math.prod(d.dim_value for d in dims if d.HasField("dim_value")) * size
    return total


def graph_inputs(path: Path) -> list[str]:
    """The names of an ONNX file's inputs (initializers listed as inputs left out)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


class _CalibrationReader:
    """Feeds up to ``samples`` training inputs to ONNX Runtime's calibrator.

    Batches larger than ``max_batch`` are fed in pieces of at most ``max_batch`` samples.
    """

    def __init__(
        self, data: DataSpec, names: list[str], samples: int, progress: bool, max_batch: int
    ) -> None:
        self._batches = iter(data)
        self._data = data
        self._names = names
        self._left = samples
        self._max_batch = max_batch
        self._pending: Inputs | None = None
        self.seen = 0
        self._bar = tqdm(
            total=samples,
            desc="calibration",
            disable=None if progress else True,
            leave=False,
            unit="sample",
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        while self._pending is None or not rows(self._pending):
            batch = next(self._batches, None) if self._left > 0 else None
            if batch is None:
                self._bar.close()
                return None
            self._pending = take(to_device(self._data.input_fn(batch), "cpu"), 0, self._left)
            self._left -= rows(self._pending)
        inputs = take(self._pending, 0, self._max_batch)
        self._pending = take(self._pending, self._max_batch)
        self.seen += rows(inputs)
        self._bar.update(rows(inputs))
        return feeds(inputs, self._names)

    def rewind(self) -> None:  # pragma: no cover - ORT calls it only for some calibrators
        self._batches = iter(self._data)
