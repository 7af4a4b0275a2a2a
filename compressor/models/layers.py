"""Finding layers by running the model: the output head, and the layer that fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, first_line
from ..inputs import call

WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model has a BatchNorm layer with learnable scales."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())


def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear layers in the order one forward pass runs them."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, WEIGHTED_LAYERS)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call(model, example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def find_head(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the layer that produces the output: the last Conv/Linear a forward pass runs."""
    order = execution_order(model, example_input)
    return order[-1] if order else None


def call_naming_layer(model: nn.Module, fn: Callable[[], Any], what: str) -> Any:
    """Return ``fn()``; if it raises inside one of ``model``'s layers, name that layer.

    The error becomes ``ModelError("<what> failed in layer 'x.y' (Conv2d): ...")``, naming
    the innermost module that was running. Errors outside any layer pass through unchanged.
    """
    stack: list[str] = []

    def pre(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any) -> None:
            stack.append(name)

        return hook

    def post(_m: nn.Module, _i: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
    try:
        return fn()
    except Exception as exc:
        if not stack:
            raise
        layer = stack[-1]
        kind = type(model.get_submodule(layer)).__name__
        msg = f"{what} failed in layer {layer!r} ({kind}): {first_line(exc)}"
        raise ModelError(msg) from exc
    finally:
        for h in handles:
            h.remove()


def unwrap_parallel(model: Any) -> Any:
    """The module ``DistributedDataParallel`` or ``DataParallel`` wraps; ``model`` otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model
