"""`SelfAttention`: ``nn.MultiheadAttention`` with its heads untied from the residual width.

In ``nn.MultiheadAttention`` the q, k and v projections are as wide as the embedding, so
torch-pruning can only remove a head by removing the same channels from the residual
stream of the whole model. `SelfAttention` computes exactly what the module it replaces
computed, with a fused ``qkv`` Linear (heads x head_dim wide) and a ``proj`` Linear, as
timm's attention does: pruning then removes whole heads, chosen by their own importance,
and the residual channels separately, by theirs. Pruning swaps it in through the
``multihead_attention`` adapter for attention layers that are called as self-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s call signature and results.

    Args:
        embed_dim: the width of the input and the output.
        num_heads: the number of heads.
        head_dim: the width of each head.
        bias: whether the projections have biases.
        dropout: dropout on the attention weights in training.
        batch_first: inputs are (batch, sequence, feature), as in ``nn.MultiheadAttention``.
        scale: multiplies q.k (default ``head_dim ** -0.5``); kept when dims are pruned.
    """

    # keeps torch's fused transformer fast path away: that path reads packed weights
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.scale = head_dim**-0.5 if scale is None else scale
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """The same attention as ``mha`` (whose q, k, v share one width and input)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            msg = "SelfAttention replaces only attention with kdim = vdim = embed_dim, no bias_kv"
            raise ValueError(msg)
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.head_dim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
        )
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        pairs = [
            (new.qkv.weight, mha.in_proj_weight),
            (new.qkv.bias, mha.in_proj_bias),
            (new.proj.weight, mha.out_proj.weight),
            (new.proj.bias, mha.out_proj.bias),
        ]
        with torch.no_grad():
            for mine, theirs in pairs:
                if theirs is not None:
                    mine.copy_(theirs)
                    mine.requires_grad_(theirs.requires_grad)
        return new.train(mha.training)

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    @property
    def in_proj_weight(self) -> torch.Tensor:  # read by nn.TransformerEncoder's checks
        return self.qkv.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: the output and, if asked, the weights."""
        unbatched = query.dim() == 2
        same = key is query and value is query
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        source = key.shape[1]
        width = self.qkv.out_features // 3
        if same:  # timm's layout, which torch-pruning maps head by head
            qkv = self.qkv(query).reshape(n, length, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:  # called with another key or value: the same weights, sliced
            w, b = self.qkv.weight, self.qkv.bias
            parts = [b[i * width : (i + 1) * width] if b is not None else None for i in range(3)]
            q = _heads(F.linear(query, w[:width], parts[0]), self.num_heads)
            k = _heads(F.linear(key, w[width : 2 * width], parts[1]), self.num_heads)
            v = _heads(F.linear(value, w[2 * width :], parts[2]), self.num_heads)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = (
                attn_mask.view(n, self.num_heads, length, source)
                if attn_mask.dim() == 3
                else attn_mask
            )
            scores = _masked(scores, mask)
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask.view(n, 1, 1, source))
        weights = F.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=self.dropout, training=self.training) @ v
        out = self.proj(attended.transpose(1, 2).reshape(n, length, -1))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if unbatched else weights


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, sequence, heads x dim) -> (batch, heads, sequence, dim)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: not attended) or a float mask added to the scores."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask.to(scores.dtype)
