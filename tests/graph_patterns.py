"""Small models of the graph patterns users bring, written outside the project's zoo.

Each is a classifier on 3x32x32 inputs with 10 classes; `PATTERNS` maps a name to its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Head(nn.Module):
    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ChunkNet(nn.Module):
    """A conv's output cut in two with ``torch.chunk``, each half through its own conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 64, stride=2)
        self.left = conv_bn(32, 32)
        self.right = conv_bn(32, 32)
        self.head = Head(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], dim=1))


class SplitNet(nn.Module):
    """``torch.split`` into unequal parts, one part through a conv, the other kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 48, stride=2)
        self.branch = nn.Sequential(conv_bn(32, 64), conv_bn(64, 32))
        self.head = Head(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), [32, 16], dim=1)
        return self.head(torch.cat([self.branch(a), b], dim=1))


class GroupedConvNet(nn.Module):
    """Grouped convolutions (groups=4, not depthwise), as in ResNeXt and RegNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, stride=2)
        self.grouped = conv_bn(32, 64, groups=4)
        self.mix = conv_bn(64, 64, groups=4)
        self.head = Head(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.grouped(self.stem(x))))


class GroupNormNet(nn.Module):
    """GroupNorm instead of BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, 2, 1)
        self.n1 = nn.GroupNorm(8, 32)
        self.c2 = nn.Conv2d(32, 64, 3, 1, 1)
        self.n2 = nn.GroupNorm(8, 64)
        self.head = Head(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.n1(self.c1(x)))
        return self.head(F.relu(self.n2(self.c2(x))))


class LayerNormNet(nn.Module):
    """ConvNeXt-style: LayerNorm over channels (channels-last), an MLP of Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 32)
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(x + y)


class Tokens(nn.Module):
    """Patches of 4x4 as tokens; subclasses add the encoder and pool the tokens."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.fc = nn.Linear(dim, 10)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.encode(tokens).mean(dim=1))


class TransformerNet(Tokens):
    """Two ``nn.TransformerEncoderLayer`` (4 heads), whose eval fast path ONNX cannot export."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class MHANet(Tokens):
    """``nn.MultiheadAttention`` (4 heads) with a residual and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


class Attention(nn.Module):
    """timm-style attention: one qkv Linear, reshape into heads, unbind, proj."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(x)


class TimmStyleNet(Tokens):
    """A pre-norm block with timm-style attention (4 heads) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(64)
        self.attn = Attention(64, 4)
        self.norm2 = nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShuffleNet(nn.Module):
    """Grouped 1x1 convs with a channel shuffle between them (ShuffleNet v1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, stride=2)
        self.g1 = conv_bn(32, 64, groups=4)
        self.g2 = conv_bn(64, 64, groups=4)
        self.head = Head(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.g1(self.stem(x))
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.g2(x))


class SqueezeExciteNet(nn.Module):
    """A squeeze-excite gate scaling a conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, stride=2)
        self.body = conv_bn(32, 64)
        self.se_reduce = nn.Conv2d(64, 16, 1)
        self.se_expand = nn.Conv2d(16, 64, 1)
        self.head = Head(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(x * gate)


class UpsampleSkipNet(nn.Module):
    """Downsample, upsample back with ``interpolate`` and add the skip (a U-Net step)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.down = conv_bn(32, 64, stride=2)
        self.up = conv_bn(64, 32)
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        y = F.interpolate(self.up(self.down(skip)), scale_factor=2.0, mode="nearest")
        return self.head(skip + y)


class CalledTwiceNet(nn.Module):
    """One conv module applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, stride=2)
        self.shared = conv_bn(32, 32)
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(self.shared(self.stem(x))))


PATTERNS = {
    "chunk": ChunkNet,
    "split": SplitNet,
    "grouped_conv": GroupedConvNet,
    "group_norm": GroupNormNet,
    "layer_norm": LayerNormNet,
    "transformer_encoder_layer": TransformerNet,
    "multihead_attention": MHANet,
    "timm_style_attention": TimmStyleNet,
    "channel_shuffle": ShuffleNet,
    "squeeze_excite": SqueezeExciteNet,
    "upsample_skip": UpsampleSkipNet,
    "called_twice": CalledTwiceNet,
}
