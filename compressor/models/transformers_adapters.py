"""Adapters for Hugging Face ``transformers`` attention (never imported from here).

BERT, RoBERTa, ELECTRA and their kin (``query``/``key``/``value`` Linears,
``num_attention_heads``, ``attention_head_size``), DistilBERT (``q_lin``/``k_lin``/``v_lin``,
``n_heads``) and ViT-style attention (``q_proj``/``k_proj``/``v_proj``,
``num_attention_heads``, ``head_dim``) compute attention as
``proj(x).view(..., -1, head_width)``: the head count follows the projections' width, the
head width is fixed. (Grouped-query attention, whose k and v have fewer heads than q, does
not match.) Pruning therefore removes whole heads
(the same heads from q, k and v, and their columns of the output projection, which
torch-pruning's graph couples with them), and the adapter keeps the head-count attributes
true for the code that reads them.
"""

from __future__ import annotations

from torch import nn

from .adapter import Adapter, Attention

_LAYOUTS = (  # (q, k, v, head-count attribute, head-width attribute)
    ("query", "key", "value", "num_attention_heads", "attention_head_size"),
    ("q_lin", "k_lin", "v_lin", "n_heads", "attention_head_size"),
    ("q_proj", "k_proj", "v_proj", "num_attention_heads", "head_dim"),
)


def _layout(module: nn.Module) -> tuple[str, ...] | None:
    for names in _LAYOUTS:
        size = getattr(module, names[4], None)
        if not isinstance(size, int) or size < 1:
            continue
        projections = [getattr(module, n, None) for n in names[:3]]
        heads = getattr(module, names[3], None)
        if isinstance(heads, int) and all(
            isinstance(p, nn.Linear) and p.out_features == heads * size for p in projections
        ):
            return names
    return None


def _attention(module: nn.Module) -> Attention | None:
    names = _layout(module)
    if names is None:
        return None
    q, k, v, heads = (getattr(module, n) for n in names[:4])
    return Attention(layer=q, heads=heads, also=(k, v))


def _set_heads(module: nn.Module, heads: int) -> None:
    layout = _layout(module) or next(n for n in _LAYOUTS if hasattr(module, n[3]))
    setattr(module, layout[3], heads)


def _widths(module: nn.Module) -> None:
    """Head count and attention width from the pruned query projection."""
    for q, _k, _v, heads, width in _LAYOUTS:
        query = getattr(module, q, None)
        if isinstance(query, nn.Linear) and isinstance(getattr(module, width, None), int):
            setattr(module, heads, query.out_features // getattr(module, width))
            if isinstance(getattr(module, "all_head_size", None), int):
                module.all_head_size = query.out_features
            return


def _is_hf_attention(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and _layout(module) is not None


ADAPTERS = (
    Adapter(
        "transformers_self_attention",
        matches=_is_hf_attention,
        attention=_attention,
        set_heads=_set_heads,
        after_pruning=_widths,
    ),
)
