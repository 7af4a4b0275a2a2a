"""What an adapter is: the model-specific knowledge pruning needs about one kind of block.

`compressor.models.adapters` holds the registry; the built-in adapters live in
`compressor.models.torch_adapters` (torch's own layers, timm-style attention) and
`compressor.models.torchvision_adapters`, `compressor.models.detection_adapters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Attention:
    """Where torch-pruning's graph sees an attention block's heads.

    ``layer`` is the layer whose output channels hold the heads side by side (a fused qkv
    Linear, or an ``nn.MultiheadAttention``); ``heads`` its head count; ``also`` other
    layers that hold the same heads side by side (separate key and value projections).
    """

    layer: nn.Module
    heads: int
    also: tuple[nn.Module, ...] = ()


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
        restructure: a module that computes what the block computes and that
            torch-pruning prunes better (e.g. attention heads untied from the residual
            width); it replaces the block before pruning, and when a checkpoint is loaded.
        restructure_if: given the block and the ``(args, kwargs)`` of its first call on
            the example input, whether to restructure it (default: always). A block the
            example does not reach is never restructured.
        detector: for a whole object detector, given it and an example batch of images:
            its dense part (images -> one ``(N, A, 4 + C)`` tensor) and the
            `compressor.models.detection.DetectionHead` that decodes, trains and scores it.

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
    restructure: Callable[[nn.Module], nn.Module] | None = None
    restructure_if: Callable[[nn.Module, tuple, dict], bool] | None = None
    detector: Callable[[nn.Module, torch.Tensor], tuple[nn.Module, Any]] | None = None


def class_named(*paths: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` test: the module's class, or a base class, is one of ``paths``.

    Paths are ``"package.module.ClassName"``; nothing is imported.
    """
    wanted = set(paths)

    def matches(module: nn.Module) -> bool:
        return any(f"{c.__module__}.{c.__qualname__}" in wanted for c in type(module).__mro__)

    return matches
