"""Adapters for torch's own attention and for timm-style attention (a fused ``qkv``).

``nn.MultiheadAttention`` called as self-attention is restructured into a `SelfAttention`
(its heads untied from the residual width), which the ``qkv_attention`` adapter then
describes; other calls (cross-attention, kdim/vdim, bias_kv) keep the module, whose heads
torch-pruning removes together with the embedding channels they occupy.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .adapter import Adapter, Attention
from .self_attention import SelfAttention


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


def _called_as_self_attention(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Query, key and value are one tensor, and the weights are the plain packed kind."""
    given = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args) :]]
    same = len(given) == 3 and given[0] is given[1] is given[2]
    return (
        same and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
    )


def _no_nested_tensors(module: nn.Module) -> None:
    """An encoder whose layers' attention was restructured runs without nested tensors."""
    layers = getattr(module, "layers", None)
    if layers and isinstance(getattr(layers[0], "self_attn", None), SelfAttention):
        module.use_nested_tensor = False


ADAPTERS = (
    Adapter(
        "multihead_attention",
        matches=lambda m: isinstance(m, nn.MultiheadAttention),
        attention=lambda m: Attention(layer=m, heads=m.num_heads),
        set_heads=set_attribute("num_heads"),
        after_pruning=_mha_widths,
        restructure=SelfAttention.from_multihead,
        restructure_if=_called_as_self_attention,
    ),
    Adapter(
        "transformer_encoder",
        matches=lambda m: isinstance(m, nn.TransformerEncoder),
        after_pruning=_no_nested_tensors,
    ),
    Adapter(
        "qkv_attention",
        matches=lambda m: _qkv_attention(m) is not None,
        attention=_qkv_attention,
        set_heads=set_attribute("num_heads"),
        after_pruning=_qkv_widths,
    ),
)
