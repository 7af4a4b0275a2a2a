"""A batch of model inputs: one tensor, or a mapping of named tensors.

An image classifier takes one tensor; a text model takes several named ones (token ids and
an attention mask, ``{"input_ids": ..., "attention_mask": ...}``). Everything that feeds a
model - training, export, calibration, measuring, parity - goes through these functions,
so both kinds travel the same way:

- a tensor is called as ``model(x)`` and exported as the ONNX input ``input``;
- a mapping is called as ``model(**x)`` and exported with one ONNX input per key, in the
  mapping's order; every tensor in it shares the batch axis 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DataError

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
SINGLE_NAME = "input"  # the ONNX input name of a one-tensor model


def check_inputs(inputs: Any) -> Inputs:
    """``inputs`` when it is a tensor or a non-empty mapping of str -> tensor with one
    batch size; otherwise a DataError naming what came instead."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            msg = f"the batch has no samples (input shape: {tuple(inputs.shape)})"
            raise DataError(msg)
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        bad = {k: type(v).__name__ for k, v in inputs.items() if not _is_batched(k, v)}
        if bad:
            msg = (
                "every named model input must be a tensor with a batch axis under a str key "
                f"(got: {bad})"
            )
            raise DataError(msg)
        sizes = {k: int(v.shape[0]) for k, v in inputs.items()}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            msg = f"named model inputs must share one non-zero batch size (got: {sizes})"
            raise DataError(msg)
        return inputs
    msg = (
        "the data's input_fn must return a torch.Tensor or a dict of named tensors "
        f"(got: {type(inputs).__name__}); pass DataSpec(loader, input_fn=...)"
    )
    raise DataError(msg)


def _is_batched(key: Any, value: Any) -> bool:
    return isinstance(key, str) and isinstance(value, torch.Tensor) and value.dim() > 0


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for named inputs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def rows(inputs: Inputs) -> int:
    """The batch size."""
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def take(inputs: Inputs, start: int, stop: int | None = None) -> Inputs:
    """Samples ``start:stop`` of the batch (every named input alike)."""
    if isinstance(inputs, Mapping):
        return {k: v[start:stop] for k, v in inputs.items()}
    return inputs[start:stop]


def cat(parts: Sequence[Inputs]) -> Inputs:
    """Batches joined along the batch axis."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index]
    return torch.cat(list(parts))  # type: ignore[arg-type]


def repeat_to(inputs: Inputs, size: int) -> Inputs:
    """A batch of exactly ``size`` samples, cycling through ``inputs``."""
    reps = -(-size // rows(inputs))

    def one(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:size].contiguous()

    if isinstance(inputs, Mapping):
        return {k: one(v) for k, v in inputs.items()}
    return one(inputs)


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """The batch on ``device`` (detached from any graph)."""
    if isinstance(inputs, Mapping):
        return {k: v.detach().to(device) for k, v in inputs.items()}
    return inputs.detach().to(device)


def is_image_batch(inputs: Inputs) -> bool:
    """True for one 4-D tensor (N, C, H, W): such models train channels-last."""
    return isinstance(inputs, torch.Tensor) and inputs.dim() == 4


def input_names(inputs: Inputs) -> list[str]:
    """The ONNX input names the batch exports as: ``input``, or the mapping's keys."""
    return list(inputs) if isinstance(inputs, Mapping) else [SINGLE_NAME]


def describe(inputs: Inputs) -> list[dict[str, Any]]:
    """Each input's ONNX name, dtype and shape without the batch axis (for the report)."""
    tensors = inputs.items() if isinstance(inputs, Mapping) else [(SINGLE_NAME, inputs)]
    return [
        {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
        for name, t in tensors
    ]


def shape_text(inputs: Inputs) -> str:
    """The batch's shapes for a message: ``(1, 3, 32, 32)`` or ``input_ids (1, 128), ...``."""
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    return str(tuple(inputs.shape))


def as_model_array(inputs: Any) -> np.ndarray:
    """One input as the array an ONNX runtime takes: float32 when it is floating point,
    its own integer type otherwise (e.g. int64 token ids)."""
    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs
    array = np.asarray(array)
    return array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array


def feeds(inputs: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The batch as an ONNX runtime's feed dict for a file whose inputs are ``names``.

    Raises:
        DataError: the named inputs and the file's inputs differ.
    """
    if not isinstance(inputs, Mapping):
        if len(names) != 1:
            msg = f"the ONNX file takes {len(names)} inputs {list(names)}; the data gives one"
            raise DataError(msg)
        return {names[0]: as_model_array(inputs)}
    if set(inputs) != set(names):
        msg = f"the ONNX file's inputs {list(names)} differ from the data's {list(inputs)}"
        raise DataError(msg)
    return {name: as_model_array(inputs[name]) for name in names}


class Positional(nn.Module):
    """Calls ``model(**dict(zip(names, args)))``: a named-input model with positional
    arguments, as the ONNX exporter traces it."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *args: torch.Tensor) -> Any:
        """The model's output on the named inputs ``args`` stands for."""
        return self.model(**dict(zip(self.names, args, strict=True)))
