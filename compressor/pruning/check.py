"""Applying a pruning plan with a check that the kept channels still compute the same.

torch-pruning maps channel indices through reshapes, splits and shuffles from the traced
graph; where a model's code does something the graph cannot show (a channel shuffle, split
sizes written as constants), the mapping is wrong and the pruned model silently computes
something else, or fails. The check: with the channels to remove set to zero (their
producers' weights and their normalisation scales and shifts), the model's output must be
what the pruned model gives. It holds exactly wherever the mapping is right, except through
layers whose statistics span channels (LayerNorm, GroupNorm, InstanceNorm, attention's
scaling), whose groups are applied unchecked. Groups that fail are restored and left whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..inputs import call
from ..models.adapters import after_pruning, attention_blocks
from .plan import GroupPlan, PlannedGroup, apply_plan, group_slices, planned_group

_UNCHECKABLE = ("LN", "IN", "MHA")  # GroupNorm groups are removed whole: exact


def apply_checked(
    model: nn.Module, example: torch.Tensor, plan: GroupPlan, pruner: Any
) -> list[PlannedGroup]:
    """Apply ``plan`` to ``model`` in place; return the groups left whole because they failed.

    The failed groups are taken out of ``plan.groups`` and their layers added to
    ``plan.left_whole``.
    """
    set_heads = _before_pruning(model)
    checkable = [g for g in plan.groups if _checkable(pruner, g)]
    failed: list[PlannedGroup] = []
    if checkable and not _try(model, example, pruner, checkable, set_heads):
        for planned in checkable:
            if not _try(model, example, pruner, [planned], set_heads):
                failed.append(planned)
    for planned in [g for g in plan.groups if g not in checkable]:
        if not _apply_unchecked(model, pruner, planned, set_heads):
            failed.append(planned)
    if failed:
        plan.groups = [g for g in plan.groups if g not in failed]
        plan.left_whole += [m for g in failed for m in g.members]
    return failed


@contextmanager
def pruned_alone(
    model: nn.Module, example: torch.Tensor, pruner: Any, planned: PlannedGroup
) -> Iterator[bool]:
    """Within the block, ``model`` with only ``planned``'s channels removed (checked as
    `apply_checked` does); yields False, and leaves the model whole, when that fails.
    The model is put back as it was afterwards, so ``pruner`` can try the next group."""
    saved = _snapshot(model)
    before = _before_pruning(model)
    try:
        if _checkable(pruner, planned):
            ok = _try(model, example, pruner, [planned], before)
        else:
            ok = _apply_unchecked(model, pruner, planned, before)
            if ok:
                after_pruning(model)
        yield ok
    finally:
        _restore(saved)


def _apply_unchecked(model: nn.Module, pruner: Any, planned: PlannedGroup, before: Any) -> bool:
    """Apply one group the zero check cannot hold for; on failure put the model back and
    say False (torch-pruning cannot prune it: it is left whole)."""
    saved = _snapshot(model)
    try:
        apply_plan(pruner, [planned], before=before)
    except Exception:
        _restore(saved)
        return False
    return True


def _before_pruning(model: nn.Module) -> Any:
    """The ``before`` callback: sets the head counts of blocks losing whole heads, and the
    group counts of GroupNorms losing whole groups."""
    modules = dict(model.named_modules())
    blocks = {
        id(layer): (module, adapter)
        for _n, module, adapter, info in attention_blocks(model)
        for layer in (info.layer, *info.also)
    }

    def before(planned: PlannedGroup) -> None:
        for name in planned.group_norms:
            norm = modules[name]
            norm.num_groups -= len(planned.remove) // (norm.num_channels // norm.num_groups)
        if not planned.removed_heads:
            return
        done = set()  # a block's q, k and v are in one group: set its heads once
        for name in planned.attention:
            module, adapter = blocks[id(modules[name])]
            if id(module) in done:
                continue
            done.add(id(module))
            heads = adapter.attention(module).heads
            if adapter.set_heads is not None:
                adapter.set_heads(module, heads - planned.removed_heads)

    return before


def _checkable(pruner: Any, planned: PlannedGroup) -> bool:
    """Whether the zero check holds exactly for this group when the mapping is right."""
    if planned.heads and not planned.removed_heads:  # head dims: attention's scale changes
        return False
    graph = pruner.DG
    group = planned_group(graph, graph.model.get_submodule(planned.root), planned)
    return not any(
        node.type.name in _UNCHECKABLE for dep, _ in group for node in (dep.source, dep.target)
    )


def _try(
    model: nn.Module,
    example: torch.Tensor,
    pruner: Any,
    groups: Sequence[PlannedGroup],
    before: Any,
) -> bool:
    """Apply ``groups``; if the kept channels compute something else, undo and say False."""
    saved = _snapshot(model)
    try:
        expected = _zeroed_output(model, example, pruner, groups)
        apply_plan(pruner, groups, before=before)
        after_pruning(model)  # the blocks' own attributes (head_dim, ...) before running
        with torch.no_grad():
            got = call(model, example)
        ok = _close(expected, got)
    except Exception:
        ok = False
    if not ok:
        _restore(saved)
    return ok


def _zeroed_output(
    model: nn.Module, example: torch.Tensor, pruner: Any, groups: Sequence[PlannedGroup]
) -> Any:
    """The model's output with the planned channels of ``groups`` set to zero (then restored)."""
    graph = pruner.DG
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for planned in groups:
                group = planned_group(graph, model.get_submodule(planned.root), planned)
                for select in ("outputs", "norms"):
                    for p, dim, idxs, _roots in group_slices(graph, group, select=select):
                        where = idxs.to(p.device)
                        saved.append((p, dim, where, p.index_select(dim, where).clone()))
                        p.index_fill_(dim, where, 0.0)
            return call(model, example)
        finally:
            for p, dim, where, values in reversed(saved):
                p.index_copy_(dim, where, values)


def _close(expected: Any, got: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)))
    if isinstance(expected, (tuple, list)):
        return (
            isinstance(got, (tuple, list))
            and len(got) == len(expected)
            and all(_close(e, g) for e, g in zip(expected, got, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(_close(expected[k], got[k]) for k in expected)
        )
    return True


_Snapshot = list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]


def _snapshot(model: nn.Module) -> _Snapshot:
    """Every module's parameters, buffers and plain attributes (torch-pruning replaces
    tensors rather than changing them, so references are enough)."""
    return [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            {k: v for k, v in vars(m).items() if not k.startswith("_")},
        )
        for m in model.modules()
    ]


def _restore(saved: _Snapshot) -> None:
    for m, params, buffers, attrs in saved:
        m._parameters.clear()
        m._parameters.update(params)
        m._buffers.clear()
        m._buffers.update(buffers)
        for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
            delattr(m, k)
        m.__dict__.update(attrs)
