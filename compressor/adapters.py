"""Model-specific knowledge in one place: adapters, matched by a module's class.

Pruning works from torch-pruning's dependency graph alone wherever it can. What the graph
cannot say comes from an adapter: where a block's attention heads are (so heads are kept
whole), the attributes to fix after widths change, blocks torch-pruning cannot trace (pruned
only inside), and layers to leave whole. Adapters match a module by class (subclasses
too), so optional libraries (timm, transformers) are never imported here. The first
registered adapter that matches a module wins; `register_adapter` puts yours first.

    >>> import compressor as cz
    >>> cz.register_adapter(cz.Adapter(
    ...     "my_attention",
    ...     matches=cz.class_named("mylib.blocks.Attention"),
    ...     attention=lambda m: cz.Attention(layer=m.to_qkv, heads=m.heads),
    ...     set_heads=lambda m, n: setattr(m, "heads", n),
    ... ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Attention:
    """Where torch-pruning's graph sees an attention block's heads.

    ``layer`` is the layer whose output channels hold the heads side by side (a fused qkv
    Linear, or an ``nn.MultiheadAttention``); ``heads`` its head count.
    """

    layer: nn.Module
    heads: int


@dataclass(frozen=True)
class Adapter:
    """What compressor needs to know about one kind of block.

    Args:
        name: shown in the report and in errors.
        matches: true for the modules this adapter describes.
        attention: the block's `Attention` (None: not an attention block).
        set_heads: sets the block's head count; called with the new count before whole
            heads are pruned.
        after_pruning: fixes the block's own attributes after widths changed (e.g. a width
            its forward reads).
        untraceable: what torch-pruning cannot trace in the block (e.g. "window
            attention"); such a block keeps its input and output widths and is pruned only
            inside its self-contained parts (MLPs, branches), and by ``prune_inside``.
        prune_inside: for an untraceable block, prunes inside it in place, given the
            pruning ratio; returns what it removed (e.g. ``{"heads_removed": 2}``).
        leave_whole: names of the block's children that pruning leaves whole.

    ``after_pruning`` must do nothing to an unpruned block and may run more than once: it
    also runs when a checkpoint is loaded.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    attention: Callable[[nn.Module], Attention | None] | None = None
    set_heads: Callable[[nn.Module, int], None] | None = None
    after_pruning: Callable[[nn.Module], None] | None = None
    untraceable: str | None = None
    prune_inside: Callable[[nn.Module, float], dict[str, int]] | None = None
    leave_whole: Callable[[nn.Module], list[str]] | None = None


def class_named(*paths: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` test: the module's class, or a base class, is one of ``paths``.

    Paths are ``"package.module.ClassName"``; nothing is imported.
    """
    wanted = set(paths)

    def matches(module: nn.Module) -> bool:
        return any(f"{c.__module__}.{c.__qualname__}" in wanted for c in type(module).__mro__)

    return matches


_REGISTRY: list[Adapter] = []


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


# ---- built-in adapters: generic ones last, so that specific ones win ----------------------


def _set_attr(attr: str) -> Callable[[nn.Module, int], None]:
    def set_heads(module: nn.Module, heads: int) -> None:
        setattr(module, attr, heads)

    return set_heads


def _qkv_attention(module: nn.Module) -> Attention | None:
    """A fused ``qkv`` Linear whose output is 3 x heads x head_dim (timm, DeiT, many more)."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or heads < 1:
        return None
    if qkv.out_features % (3 * heads):
        return None
    return Attention(layer=qkv, heads=heads)


def _qkv_widths(module: nn.Module) -> None:
    """Head width and attention width from the pruned qkv Linear (timm's attributes)."""
    head_dim = module.qkv.out_features // (3 * module.num_heads)
    if isinstance(getattr(module, "head_dim", None), int):
        module.head_dim = head_dim
    if isinstance(getattr(module, "attn_dim", None), int):
        module.attn_dim = head_dim * module.num_heads


def _vit_widths(module: nn.Module) -> None:
    module.hidden_dim = module.conv_proj.out_channels


def _mha_widths(module: nn.Module) -> None:
    module.head_dim = module.embed_dim // module.num_heads


def _prune_maxvit_heads(module: nn.Module, ratio: float) -> dict[str, int]:
    """Remove whole heads of torchvision MaxVit's attention: the lowest-norm ``ratio``."""
    import torch
    import torch_pruning as tp

    heads, size = module.n_heads, module.head_dim
    kept = max(1, round(heads * (1 - ratio)))
    if kept == heads:
        return {"heads_removed": 0}
    with torch.no_grad():
        rows = module.to_qkv.weight.detach().view(3, heads, size, -1).pow(2).sum(dim=(0, 2, 3))
        cols = module.merge.weight.detach().view(-1, heads, size).pow(2).sum(dim=(0, 2))
        order = torch.argsort(rows + cols, stable=True).tolist()
    drop = sorted(order[: heads - kept])
    keep = [h for h in range(heads) if h not in drop]
    per_head = [h * size + j for h in drop for j in range(size)]
    tp.prune_linear_out_channels(
        module.to_qkv, [part * heads * size + i for part in range(3) for i in per_head]
    )
    tp.prune_linear_in_channels(module.merge, per_head)
    table = module.relative_position_bias_table
    module.relative_position_bias_table = nn.Parameter(table.detach()[:, keep].clone())
    module.n_heads = kept
    _maxvit_widths(module)
    return {"heads_removed": len(drop)}


def _maxvit_widths(module: nn.Module) -> None:
    """A MaxVit attention with fewer heads runs a forward that reads the heads' width."""
    if module.n_heads * module.head_dim != module.merge.out_features:
        module.__class__ = _pruned_maxvit_class(type(module))


def _pruned_maxvit_class(base: type) -> type:
    if getattr(base, "_compressor_pruned", False):
        return base
    import torch
    import torch.nn.functional as F

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward, with the heads' width where it used the block's width."""
        b, g, p, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4) * self.scale_factor
        v = v.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        dot = F.softmax(dot + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh))

    name = f"Pruned{base.__name__}"
    return type(name, (base,), {"forward": forward, "_compressor_pruned": True})


BUILT_IN = (
    Adapter(
        "torchvision_vit",
        matches=class_named("torchvision.models.vision_transformer.VisionTransformer"),
        after_pruning=_vit_widths,
    ),
    Adapter(
        "torchvision_swin_attention",
        matches=class_named(
            "torchvision.models.swin_transformer.ShiftedWindowAttention",
            "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
        ),
        untraceable="window attention",
    ),
    Adapter(
        "torchvision_maxvit_attention",
        matches=class_named("torchvision.models.maxvit.RelativePositionalMultiHeadAttention"),
        untraceable="window attention",
        prune_inside=_prune_maxvit_heads,
        after_pruning=_maxvit_widths,
    ),
    Adapter(
        "torchvision_shufflenet_v2_block",
        matches=class_named("torchvision.models.shufflenetv2.InvertedResidual"),
        untraceable="channel shuffle",
    ),
    Adapter(
        "multihead_attention",
        matches=lambda m: isinstance(m, nn.MultiheadAttention),
        attention=lambda m: Attention(layer=m, heads=m.num_heads),
        set_heads=_set_attr("num_heads"),
        after_pruning=_mha_widths,
    ),
    Adapter(
        "qkv_attention",
        matches=lambda m: _qkv_attention(m) is not None,
        attention=_qkv_attention,
        set_heads=_set_attr("num_heads"),
        after_pruning=_qkv_widths,
    ),
)
_REGISTRY.extend(BUILT_IN)


def describe(model: nn.Module) -> dict[str, Any]:
    """Which adapters matched ``model``: adapter name -> number of blocks (for the report)."""
    counts: dict[str, int] = {}
    for _name, _module, adapter in matched(model):
        counts[adapter.name] = counts.get(adapter.name, 0) + 1
    return counts
