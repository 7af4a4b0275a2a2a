"""Adapters for torchvision's transformers and ShuffleNetV2.

- ViT: ``hidden_dim``, read in forward, follows the pruned embedding.
- Swin (V1, V2) and MaxVit: torch-pruning cannot trace their window attention; their
  adapters remove whole heads inside the block (the rows of ``qkv``/``to_qkv`` for each of
  q, k and v, the columns of the output projection, the heads' relative position biases)
  and give the block a forward that reads the heads' width where torchvision's reads the
  block's width.
- ShuffleNetV2: torch-pruning cannot trace the channel shuffle; the branches are pruned
  inside.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, class_named


def _vit_widths(module: nn.Module) -> None:
    module.hidden_dim = module.conv_proj.out_channels


def _head_scores(qkv: nn.Linear, out: nn.Linear, heads: int) -> torch.Tensor:
    """Squared weight norm of each head over its q, k, v rows and output-projection columns."""
    size = qkv.out_features // (3 * heads)
    rows = qkv.weight.detach().view(3, heads, size, -1).pow(2).sum(dim=(0, 2, 3))
    cols = out.weight.detach().view(out.out_features, heads, size).pow(2).sum(dim=(0, 2))
    return rows + cols


def _remove_heads(qkv: nn.Linear, out: nn.Linear, heads: int, ratio: float) -> list[int]:
    """Remove the lowest-scoring ``ratio`` of heads from a fused qkv and its projection.

    Returns the kept heads (ascending); nothing changes when all are kept.
    """
    import torch_pruning as tp

    kept_count = max(1, round(heads * (1 - ratio)))
    if kept_count == heads:
        return list(range(heads))
    size = qkv.out_features // (3 * heads)
    order = torch.argsort(_head_scores(qkv, out, heads), stable=True).tolist()
    drop = sorted(order[: heads - kept_count])
    per_head = [h * size + j for h in drop for j in range(size)]
    rows = [part * heads * size + i for part in range(3) for i in per_head]
    tp.prune_linear_out_channels(qkv, rows)
    tp.prune_linear_in_channels(out, per_head)
    return [h for h in range(heads) if h not in drop]


def _keep_columns(module: nn.Module, name: str, keep: list[int], dim: int) -> None:
    tensor = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.detach().index_select(dim, torch.tensor(keep))))


def _prune_maxvit_heads(module: nn.Module, ratio: float) -> dict[str, int]:
    """Whole heads of MaxVit's attention (``to_qkv``, ``merge``, the bias table)."""
    heads = module.n_heads
    keep = _remove_heads(module.to_qkv, module.merge, heads, ratio)
    if len(keep) == heads:
        return {"heads_removed": 0}
    _keep_columns(module, "relative_position_bias_table", keep, 1)
    module.n_heads = len(keep)
    _maxvit_widths(module)
    return {"heads_removed": heads - len(keep)}


def _maxvit_widths(module: nn.Module) -> None:
    """A MaxVit attention with fewer heads runs a forward that reads the heads' width."""
    if module.n_heads * module.head_dim != module.merge.out_features:
        module.__class__ = _subclass(type(module), _maxvit_forward)


def _maxvit_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
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


def _prune_swin_heads(module: nn.Module, ratio: float) -> dict[str, int]:
    """Whole heads of Swin's window attention (V1: the bias table; V2: cpb_mlp, logit_scale)."""
    heads = module.num_heads
    keep = _remove_heads(module.qkv, module.proj, heads, ratio)
    if len(keep) == heads:
        return {"heads_removed": 0}
    if hasattr(module, "logit_scale"):  # V2: the bias MLP's last layer makes one per head
        import torch_pruning as tp

        last = module.cpb_mlp[-1]
        tp.prune_linear_out_channels(last, [h for h in range(heads) if h not in keep])
        _keep_columns(module, "logit_scale", keep, 0)
    else:
        _keep_columns(module, "relative_position_bias_table", keep, 1)
    module.num_heads = len(keep)
    _swin_widths(module)
    return {"heads_removed": heads - len(keep)}


def _swin_widths(module: nn.Module) -> None:
    """A Swin attention with fewer heads runs a forward that reads the heads' width."""
    if module.qkv.out_features != 3 * module.proj.out_features:
        module.__class__ = _subclass(type(module), _swin_forward)


def _swin_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _window_attention(self, x, self.get_relative_position_bias())


def _window_attention(module: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (BSD-3-Clause, torchvision 0.29), where
    the attention width is the qkv Linear's, not the block's: heads may have been removed."""
    window, heads = module.window_size, module.num_heads
    logit_scale = getattr(module, "logit_scale", None)
    b, h, w, c = x.shape
    pad_r = (window[1] - w % window[1]) % window[1]
    pad_b = (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(module.shift_size)
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * windows, window[0] * window[1], c)
    qkv_bias = module.qkv.bias
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    width = module.qkv.out_features // 3
    qkv = F.linear(x, module.qkv.weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (width // heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // windows, windows, heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), width)
    # functional, as torchvision's: MAC counters that hook modules see neither version's
    x = F.linear(x, module.proj.weight, module.proj.bias)
    x = F.dropout(x, p=module.dropout, training=module.training)
    x = x.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _subclass(base: type, forward: Any) -> type:
    """``base`` with ``forward`` replaced (once: a subclass made here is returned as is)."""
    if getattr(base, "_compressor_pruned", False):
        return base
    return type(f"Pruned{base.__name__}", (base,), {"forward": forward, "_compressor_pruned": True})


ADAPTERS = (
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
        prune_inside=_prune_swin_heads,
        after_pruning=_swin_widths,
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
)
