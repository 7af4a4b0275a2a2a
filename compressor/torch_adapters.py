"""Adapters for torch's own attention and for timm-style attention (a fused ``qkv``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .adapter import Adapter, Attention


def set_attribute(attr: str) -> Callable[[nn.Module, int], None]:
    """A ``set_heads`` that sets the block's attribute ``attr``."""

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


def _mha_widths(module: nn.Module) -> None:
    module.head_dim = module.embed_dim // module.num_heads


ADAPTERS = (
    Adapter(
        "multihead_attention",
        matches=lambda m: isinstance(m, nn.MultiheadAttention),
        attention=lambda m: Attention(layer=m, heads=m.num_heads),
        set_heads=set_attribute("num_heads"),
        after_pruning=_mha_widths,
    ),
    Adapter(
        "qkv_attention",
        matches=lambda m: _qkv_attention(m) is not None,
        attention=_qkv_attention,
        set_heads=set_attribute("num_heads"),
        after_pruning=_qkv_widths,
    ),
)
