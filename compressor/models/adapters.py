"""Model-specific knowledge in one place: the adapter registry.

Pruning works from torch-pruning's dependency graph alone wherever it can. What the graph
cannot say comes from an `Adapter` (`compressor.models.adapter`): where a block's attention heads
are (so heads are kept whole), the attributes to fix after widths change, blocks
torch-pruning cannot trace (pruned only inside), and layers to leave whole. Adapters match
a module by class (subclasses too), so optional libraries (timm, transformers) are never
imported here. The first registered adapter that matches a module wins; `register_adapter`
puts yours first; the built-in torchvision adapters come before the generic ones.

    >>> import compressor as cz
    >>> cz.register_adapter(cz.Adapter(
    ...     "my_attention",
    ...     matches=cz.class_named("mylib.blocks.Attention"),
    ...     attention=lambda m: cz.Attention(layer=m.to_qkv, heads=m.heads),
    ...     set_heads=lambda m, n: setattr(m, "heads", n),
    ... ))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inputs import call
from . import detection_adapters, torch_adapters, torchvision_adapters, transformers_adapters
from .adapter import Adapter, Attention, class_named

__all__ = ["Adapter", "Attention", "class_named", "register_adapter", "unregister_adapter"]

_REGISTRY: list[Adapter] = [
    *torchvision_adapters.ADAPTERS,
    *detection_adapters.ADAPTERS,
    *transformers_adapters.ADAPTERS,
    *torch_adapters.ADAPTERS,
]


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Add ``adapter``; ``first`` (default) puts it before the built-in ones."""
    if not isinstance(adapter, Adapter):
        msg = f"register_adapter takes an Adapter (got: {adapter!r})"
        raise TypeError(msg)
    if any(a.name == adapter.name for a in _REGISTRY):
        msg = f"an adapter named {adapter.name!r} is already registered"
        raise ValueError(msg)
    if first:
        _REGISTRY.insert(0, adapter)
    else:
        _REGISTRY.append(adapter)
    return adapter


def unregister_adapter(name: str) -> None:
    """Remove the adapter called ``name``."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != name]


def adapters() -> list[Adapter]:
    """The registered adapters, in the order they are tried."""
    return list(_REGISTRY)


def adapter_for(module: nn.Module) -> Adapter | None:
    """The first adapter that matches ``module``, or None."""
    return next((a for a in _REGISTRY if a.matches(module)), None)


def matched(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """Every ``(name, module, adapter)`` of ``model`` an adapter matches."""
    found = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            found.append((name, module, adapter))
    return found


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Adapter, Attention]]:
    """The attention blocks of ``model``, and where their heads are."""
    found = []
    for name, module, adapter in matched(model):
        if adapter.attention is None:
            continue
        info = adapter.attention(module)
        if info is not None:
            found.append((name, module, adapter, info))
    return found


def dense_detector(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, Any] | None:
    """``model``'s dense part and `compressor.models.detection.DetectionHead` when an adapter
    says ``model`` is a whole object detector (its ``detector``); else None."""
    adapter = adapter_for(model)
    if adapter is None or adapter.detector is None:
        return None
    return adapter.detector(model, example)


def untraceable_blocks(model: nn.Module) -> dict[str, str]:
    """Names of the blocks torch-pruning cannot trace, each with what it is."""
    return {name: a.untraceable for name, _m, a in matched(model) if a.untraceable}


def layers_left_whole(model: nn.Module) -> list[str]:
    """Layers the adapters say pruning must leave whole, by full name."""
    names = []
    for name, module, adapter in matched(model):
        if adapter.leave_whole is not None:
            names += [f"{name}.{child}" if name else child for child in adapter.leave_whole(module)]
    return names


def after_pruning(model: nn.Module) -> None:
    """Let every matching adapter fix its block's attributes after pruning."""
    for _name, module, adapter in matched(model):
        if adapter.after_pruning is not None:
            adapter.after_pruning(module)


def restructure(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Replace, in place, the blocks whose adapters restructure them; name -> adapter.

    ``example`` is run once through the model to see how each block is called (an
    adapter's ``restructure_if``). The replacements compute what the blocks computed.
    """
    candidates = [(n, m, a) for n, m, a in matched(model) if n and a.restructure is not None]
    if not candidates:
        return {}
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (args, kwargs))

        return hook

    hooks = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m, _a in candidates]
    try:
        with torch.no_grad():
            call(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    chosen = {
        n: a.name
        for n, m, a in candidates
        if n in calls and (a.restructure_if is None or a.restructure_if(m, *calls[n]))
    }
    restructure_named(model, chosen)
    return chosen


def restructure_named(model: nn.Module, names: dict[str, str]) -> None:
    """Restructure the blocks ``names`` gives (name -> adapter name), as a checkpoint says.

    Raises:
        KeyError: an adapter that is not registered.
    """
    by_name = {a.name: a for a in _REGISTRY}
    for name, adapter_name in names.items():
        adapter = by_name.get(adapter_name)
        if adapter is None or adapter.restructure is None:
            msg = (
                f"block {name!r} was restructured by the adapter {adapter_name!r}, which is "
                f"not registered (registered: {', '.join(by_name)})"
            )
            raise KeyError(msg)
        parent_name, _, leaf = name.rpartition(".")
        new = adapter.restructure(model.get_submodule(name))
        new._compressor_restructured = adapter_name
        setattr(model.get_submodule(parent_name), leaf, new)
    if names:
        after_pruning(model)


def restructured(model: nn.Module) -> dict[str, str]:
    """The blocks of ``model`` an adapter restructured: name -> adapter name."""
    return {
        name: m._compressor_restructured
        for name, m in model.named_modules()
        if isinstance(getattr(m, "_compressor_restructured", None), str)
    }


def describe(model: nn.Module) -> dict[str, Any]:
    """Which adapters matched ``model``: adapter name -> number of blocks (for the report)."""
    counts: dict[str, int] = {}
    for _name, _module, adapter in matched(model):
        counts[adapter.name] = counts.get(adapter.name, 0) + 1
    return counts
