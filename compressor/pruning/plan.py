"""The pruning plan that sparsity training and structured pruning share.

A plan says which channels of which coupled channel group go. Groups come from
torch-pruning's dependency graph (a residual add, a concatenation or a flatten -> Linear
couples layers whose channels must go together); each channel of a group is scored by the
importance; channels are allocated across groups (globally by score, or the same share of
each group), and the kept width of a group stays a multiple of ``round_to``.

`SparsityTraining` computes the plan that the following `StructuredPruning` will compute and
drives exactly those channels to zero; `StructuredPruning` computes the plan again on the
sparsified model. Channels whose parameters are all exactly zero ("dead") are always removed
first, so the second plan finds the channels the first one scheduled.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError
from ..models.layers import has_batchnorm

IMPORTANCES = ("auto", "bn_scale", "l1", "l2", "lamp", "fpgm", "random")

_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


@dataclass(frozen=True)
class Allocation:
    """How many channels to remove and where: the pruning options the plan depends on.

    Args:
        ratio: share of the prunable channels removed (overall with ``global_allocation``,
            from every group otherwise).
        global_allocation: rank the channels of all groups together by score.
        max_layer_ratio: the largest share any one group may lose (global allocation);
            None: halfway between ``ratio`` and 1.
        round_to: kept widths are multiples of this (None: any width).
        cost: with global allocation, each group's cost per channel (by root name, 1.0 the
            mean; `compressor.pruning.latency_table`): channels are ranked by score per cost, so
            those that save most time for their importance go first.
    """

    ratio: float
    global_allocation: bool = True
    max_layer_ratio: float | None = None
    round_to: int | None = None
    cost: Mapping[str, float] | None = None

    @property
    def cap(self) -> float:
        """The largest share of a group's channels that may go."""
        if not self.global_allocation:
            return self.ratio
        if self.max_layer_ratio is not None:
            return max(self.max_layer_ratio, self.ratio)
        return self.ratio + (1 - self.ratio) / 2


@dataclass
class PlannedGroup:
    """One coupled channel group: its root layer, width, scores, and the channels to remove.

    ``members`` names every Conv/Linear whose output channels the group holds,
    ``consumers`` those whose input channels it holds; ``whole``
    marks a group the allocation must leave whole (too narrow). A position (unit) is
    ``unit_size`` neighbouring channels (a whole attention head) repeated in each of
    ``channel_groups`` equal parts of the width (a grouped conv's groups, a chunk's parts,
    the heads when head dimensions are pruned). ``heads`` > 0 marks an attention group,
    ``attention`` names the layers torch-pruning sees its heads at; ``group_norms`` the
    GroupNorm layers whose groups are the units (removed whole).
    """

    root: str
    out_channels: bool
    width: int
    scores: torch.Tensor
    dead: torch.Tensor
    channel_groups: int = 1
    unit_size: int = 1
    heads: int = 0
    attention: list[str] = field(default_factory=list)
    group_norms: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)
    whole: bool = False

    @property
    def units(self) -> int:
        """Prunable positions in one channel group (channels, or whole heads)."""
        return self.width // (self.channel_groups * self.unit_size)

    @property
    def removed_heads(self) -> int:
        """Whole heads this group removes (0 unless heads are pruned whole)."""
        return len(self.remove) // self.unit_size if self.heads and self.unit_size > 1 else 0

    @property
    def removed_units(self) -> int:
        """Units (heads, GroupNorm groups, channels) removed from each channel group."""
        return len(self.remove) // (self.unit_size * self.channel_groups)

    def expanded(self, positions: Sequence[int]) -> list[int]:
        """Root channel indices of ``positions``: each unit's channels, in every group."""
        part, size = self.units * self.unit_size, self.unit_size
        return sorted(
            g * part + p * size + j
            for g in range(self.channel_groups)
            for p in positions
            for j in range(size)
        )

    def unit_view(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one per channel) as ``(channel_groups, units, unit_size)``."""
        return values.view(self.channel_groups, self.units, self.unit_size)


@dataclass
class GroupPlan:
    """The channels a pruning step removes, group by group, and what was left whole.

    ``groups`` are the groups that lose channels; ``groups_seen`` every prunable group.
    """

    groups: list[PlannedGroup]
    importance: str
    allocation: Allocation
    left_whole: list[str]
    kept_at_round_to: list[str]
    groups_seen: list[PlannedGroup] = field(default_factory=list)
    too_narrow: list[str] = field(default_factory=list)
    latency_table: dict[str, Any] | None = None
    """With latency-aware allocation: the layer timings' record
    (`compressor.pruning.latency_table`)."""

    @property
    def prunable_channels(self) -> int:
        """Channels of every group the plan could prune, whether it removes any or not."""
        return sum(g.width for g in self.groups_seen)

    @property
    def removed_channels(self) -> int:
        return sum(len(g.remove) for g in self.groups)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the report: how much went, the range of per-group shares."""
        shares = [len(g.remove) / g.width for g in self.groups_seen if g.width]
        removed_dead = sum(int(g.dead[g.remove].sum()) for g in self.groups if g.remove)
        removed = self.removed_channels
        total_score = sum(float(g.scores.clamp(min=0).sum()) for g in self.groups_seen)
        removed_score = sum(
            float(g.scores[g.remove].clamp(min=0).sum()) for g in self.groups if g.remove
        )
        return {
            "allocation": "uniform"
            if not self.allocation.global_allocation
            else ("latency" if self.allocation.cost else "global"),
            "max_layer_ratio": round(self.allocation.cap, 4),
            "prunable_channels": self.prunable_channels,
            "removed_channels": removed,
            "removed_fraction": round(removed / self.prunable_channels, 4)
            if self.prunable_channels
            else 0.0,
            "layer_ratio_min": round(min(shares), 4) if shares else 0.0,
            "layer_ratio_max": round(max(shares), 4) if shares else 0.0,
            "removed_at_zero_fraction": round(removed_dead / removed, 4) if removed else None,
            "removed_score_share": round(removed_score / total_score, 4) if total_score else None,
        }


class BatchNormScaleImportance:
    """Channel importance = mean |gamma| over the group's BatchNorm layers (network slimming).

    Unnormalised, so scores compare across groups (network slimming's global threshold).
    Unlike ``tp.importance.BNScaleImportance`` (torch-pruning 1.6), a group through a
    concatenation, whose BatchNorms cover only part of the root's channels, is scored too:
    every BatchNorm adds into the channels it covers, however they map to the root.
    """

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        import torch_pruning as tp

        width = 1 + max(r for item in group for r in item.root_idxs if r is not None)
        total = torch.zeros(width)
        count = torch.zeros(width)
        for i, (dep, idxs) in enumerate(group):
            layer, root_idxs = dep.layer, group[i].root_idxs
            if dep.pruning_fn != tp.prune_batchnorm_out_channels or not layer.affine:
                continue
            if any(r is None for r in root_idxs):
                continue
            where = torch.tensor(root_idxs)
            total.scatter_add_(0, where, layer.weight.detach().abs()[idxs].float().cpu())
            count.scatter_add_(0, where, torch.ones(len(idxs)))
        if not bool((count > 0).any()):
            return None
        return total / count.clamp(min=1)


def auto_importances(model: nn.Module) -> tuple[str, ...]:
    """The importances ``auto`` compares when pruning to a target: the quantity
    `SparsityTraining` drives to zero (``bn_scale`` with BatchNorm, else ``l2``) and LAMP."""
    return ("bn_scale" if has_batchnorm(model) else "l2", "lamp")


def resolve_importance(name: str, model: nn.Module) -> tuple[str, Any]:
    """The torch-pruning importance object for ``name`` (``auto`` resolved for ``model``)."""
    import torch_pruning as tp

    if name == "auto":
        name = "bn_scale" if has_batchnorm(model) else "l2"
    if name == "bn_scale" and not has_batchnorm(model):
        msg = (
            "structured_pruning.importance 'bn_scale' needs BatchNorm layers; "
            "this model has none (use 'l2')"
        )
        raise RecipeError(msg)
    factories = {
        "bn_scale": lambda: BatchNormScaleImportance(),
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
    }
    return name, factories[name]()


def build_pruner(
    model: nn.Module,
    example: torch.Tensor,
    importance: Any,
    ignored: list[nn.Module],
    num_heads: dict[nn.Module, int] | None = None,
) -> Any:
    """torch-pruning's BasePruner for ``model``: its dependency graph and channel groups.

    ``num_heads`` gives the head count of each attention layer (see `compressor.models.adapters`).
    Not under ``torch.no_grad()``: torch-pruning traces the graph through autograd.
    """
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.BasePruner(
            model,
            example,
            importance=importance,
            ignored_layers=ignored,
            num_heads=dict(num_heads or {}),
        )


def plan_groups(
    model: nn.Module,
    example: torch.Tensor,
    *,
    importance: str,
    allocation: Allocation,
    ignored: list[nn.Module],
    num_heads: dict[nn.Module, int] | None = None,
    whole_heads: bool = True,
    cost: Callable[[list[PlannedGroup]], Mapping[str, float]] | None = None,
) -> tuple[GroupPlan, Any]:
    """Score every prunable group of ``model`` and choose the channels to remove.

    ``num_heads``: the head count of each attention layer. A group holding attention heads
    loses whole heads (``whole_heads``) or the same dimensions of every head. ``cost``, given
    the groups, returns each one's cost per channel for the allocation (`Allocation.cost`).
    Returns the plan and the torch-pruning pruner it was made with (`apply_plan` uses it).
    """
    importance_name, scorer = resolve_importance(importance, model)
    pruner = build_pruner(model, example, scorer, ignored, num_heads)
    graph = pruner.DG
    groups: list[PlannedGroup] = []
    unmapped: list[str] = []
    with torch.no_grad():
        for group in graph.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        ):
            if not pruner._check_pruning_ratio(group):
                continue
            is_attention, attention_layers = pruner._is_atten_group(group)
            if is_attention:  # rooted where the heads lie side by side, as torch-pruning does
                group = pruner._downstream_node_as_root_if_attention(group) or group
            try:
                scores = scorer(group)
                dead = dead_channels(graph, group, len(scores)) if scores is not None else None
            except (IndexError, RuntimeError, TypeError):  # torch-pruning mis-mapped it
                unmapped.extend(_members(graph, group))
                continue
            if scores is None:
                continue
            root = group[0].dep.target.module
            width = len(scores)
            channel_groups = max(pruner._get_channel_groups(group), _split_parts(graph, group))
            unit_size, heads = 1, 0
            if is_attention:
                heads = max(pruner.num_heads[m] for m in attention_layers)
                if whole_heads and heads > 1:
                    channel_groups, unit_size = 1, width // heads
            norms = _group_norms(group)
            if norms:
                if is_attention or any(n.num_channels != width for n in norms):
                    continue  # GroupNorm groups that do not line up with the channels
                # torch-pruning counts a GroupNorm's groups as channel groups; here they
                # are units instead, so whole groups go
                channel_groups = _split_parts(graph, group)
                unit_size = math.lcm(*(n.num_channels // n.num_groups for n in norms))
            if width % (channel_groups * unit_size):
                continue
            groups.append(
                PlannedGroup(
                    root=graph._module2name[root],
                    out_channels=graph.is_out_channel_pruning_fn(group[0].dep.handler),
                    width=width,
                    scores=scores.detach().float().cpu(),
                    dead=dead.cpu(),
                    channel_groups=channel_groups,
                    unit_size=unit_size,
                    heads=heads,
                    attention=[graph._module2name[m] for m in attention_layers],
                    group_norms=[graph._module2name[n] for n in norms],
                    members=_members(graph, group),
                    consumers=_members(graph, group, out_channels=False),
                )
            )
    if cost is not None and allocation.global_allocation:
        allocation = dataclasses.replace(allocation, cost=cost(groups))
    left_whole, kept_at_round_to = allocate(groups, allocation)
    plan = GroupPlan(
        groups=[g for g in groups if g.remove],
        importance=importance_name,
        allocation=allocation,
        left_whole=left_whole + [n for n in unmapped if n not in left_whole],
        kept_at_round_to=kept_at_round_to,
        groups_seen=[g for g in groups if not g.whole],
        too_narrow=left_whole,
    )
    return plan, pruner


def planned_group(graph: Any, module: nn.Module, planned: PlannedGroup) -> Any:
    """torch-pruning's group that removes ``planned.remove`` from ``module`` (its root)."""
    layer_pruner = graph.get_pruner_of_module(module)
    if planned.out_channels:
        handler = layer_pruner.prune_out_channels
    else:
        handler = layer_pruner.prune_in_channels
    return graph.get_pruning_group(module, handler, planned.remove)


def apply_plan(
    pruner: Any,
    plan: GroupPlan | Sequence[PlannedGroup],
    before: Callable[[PlannedGroup], None] | None = None,
) -> None:
    """Remove the planned channels from the model ``pruner`` was built on, in place.

    ``before`` is called with each group before it is pruned (e.g. to set head counts).
    """
    graph = pruner.DG
    modules = dict(graph.model.named_modules())
    groups = plan.groups if isinstance(plan, GroupPlan) else plan
    for planned in groups:
        if before is not None:
            before(planned)
        group = planned_group(graph, modules[planned.root], planned)
        if graph.check_pruning_group(group):
            group.prune()


def allocate(groups: list[PlannedGroup], allocation: Allocation) -> tuple[list[str], list[str]]:
    """Fill each group's ``remove`` list; return the groups left whole and kept at round_to.

    A group keeps at least ``round_to`` channels (and is left whole when it has no more),
    at least ``1 - cap`` of its width, and a multiple of ``round_to``. Dead channels (all
    parameters exactly zero) go first and always go. Global allocation removes the
    lowest-scoring steps of all groups until ``ratio`` of the prunable channels are gone;
    uniform allocation removes the same share of every group.
    """
    left_whole: list[str] = []
    kept_at_round_to: list[str] = []
    steps: list[tuple[float, int, int, int]] = []  # (score, group, step, removed after it)
    orders: list[list[int]] = []
    for index, g in enumerate(groups):
        unit_scores = g.unit_view(g.scores).mean(dim=(0, 2))
        unit_dead = g.unit_view(g.dead).all(dim=2).all(dim=0)
        if allocation.cost and allocation.global_allocation:  # importance per unit of cost
            unit_scores = unit_scores / allocation.cost.get(g.root, 1.0)
        keyed = torch.where(unit_dead, torch.full_like(unit_scores, -1.0), unit_scores)
        order = torch.argsort(keyed, stable=True).tolist()
        orders.append(order)
        counts = _allowed_removals(g, allocation)
        if not counts:
            g.whole = True
            left_whole.extend(g.members)
            continue
        if not allocation.global_allocation:
            wanted = _uniform_removal(g, allocation)
            chosen = min([c for c in counts if c >= wanted] or [counts[-1]]) if wanted else 0
            dead = int(unit_dead.sum())
            if dead:
                chosen = max(chosen, min([c for c in counts if c >= dead] or [counts[-1]]))
            g.remove = g.expanded(order[:chosen])
            if chosen and chosen == counts[-1] and g.units - chosen == allocation.round_to:
                kept_at_round_to.extend(g.members)
            continue
        previous = 0
        for step, count in enumerate(counts):
            block = keyed[order[previous:count]]
            steps.append((float(block.max()), index, step, count))
            previous = count
    if allocation.global_allocation:
        target = round(allocation.ratio * sum(g.width for g in groups if not g.whole))
        taken = [0] * len(groups)
        removed = 0
        for score, index, _step, count in sorted(steps):
            g = groups[index]
            if score >= 0 and removed >= target:
                break
            removed += (count - taken[index]) * g.channel_groups * g.unit_size
            taken[index] = count
        for index, g in enumerate(groups):
            g.remove = g.expanded(orders[index][: taken[index]])
            if taken[index] and g.units - taken[index] == allocation.round_to:
                kept_at_round_to.extend(g.members)
    return left_whole, sorted(kept_at_round_to)


def _group_norms(group: Any) -> list[nn.GroupNorm]:
    """The GroupNorm layers of a group (their channel groups must be removed whole)."""
    found = [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.GroupNorm)]
    return list({id(n): n for n in found}.values())


def _split_parts(graph: Any, group: Any) -> int:
    """Equal parts a ``torch.chunk``/``split`` cuts the group's channels into (1: none).

    Removing the same positions from every part keeps the parts equal, as ``chunk`` needs.
    """
    import torch_pruning as tp

    parts = 1
    for dep, _ in group:
        for node in (dep.source, dep.target):
            sizes = getattr(node.module, "split_sizes", None)
            if node.type == tp.ops.OPTYPE.SPLIT and sizes and len(set(sizes)) == 1:
                parts = math.lcm(parts, len(sizes))
    return parts


def _members(graph: Any, group: Any, *, out_channels: bool = True) -> list[str]:
    """The Conv/Linear layers whose output (else input) channels ``group`` holds."""
    names = [
        graph._module2name[dep.target.module]
        for dep, _ in group
        if graph.is_out_channel_pruning_fn(dep.handler) == out_channels
        and isinstance(dep.target.module, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    return list(dict.fromkeys(names))


def _uniform_removal(g: PlannedGroup, allocation: Allocation) -> int:
    """Positions ``ratio`` removes from a group, as torch-pruning counts them.

    Units of several channels (whole heads, GroupNorm groups) are few: the nearest count.
    """
    if g.unit_size > 1:
        return g.units - max(1, round(g.units * (1 - allocation.ratio)))
    kept = int(g.units * (1 - allocation.ratio) + 1e-9)
    return g.units - kept


def _allowed_removals(g: PlannedGroup, allocation: Allocation) -> list[int]:
    """The numbers of positions the group may lose, ascending (empty: leave it whole)."""
    units, round_to = g.units, allocation.round_to
    plain = g.channel_groups == 1 and g.unit_size == 1
    rounding = round_to if round_to and round_to > 1 and plain else 1
    if units <= rounding:
        return []
    floor = max(rounding, math.ceil(units * (1 - allocation.cap) - 1e-9), 1)
    if not allocation.global_allocation:
        floor = max(rounding, 1)
    kept = [k for k in range(units - 1, floor - 1, -1) if k % rounding == 0]
    return [units - k for k in kept]


Slice = tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]


def group_slices(graph: Any, group: Any, *, select: str = "all") -> list[Slice]:
    """The parameter slices a group's channels own: ``(param, dim, indices, root indices)``.

    Covers Conv, Linear, normalisation layers and free parameters (such as a position
    embedding): the producers of a channel and its consumers (the next layers' input
    slices). ``select``: ``all``, ``outputs`` (producers only) or ``norms`` (normalisation
    layers only).
    """
    outputs_only = select != "all"
    found: dict[tuple[int, int], tuple[torch.Tensor, int, list[int], list[int]]] = {}
    for item in group:
        dep, idxs, roots = item.dep, list(item.idxs), item.root_idxs
        if not idxs or roots is None or any(r is None for r in roots):
            continue
        m = dep.target.module
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        params: list[tuple[torch.Tensor | None, int]] = []
        if select == "norms" and not isinstance(m, _NORMS):
            continue
        if isinstance(m, nn.Parameter):
            params = [(m, dep.target.pruning_dim)]
        elif isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if is_out or depthwise:
                params = [(m.weight, 1 if m.transposed else 0), (m.bias, 0)]
            elif m.groups == 1 and not outputs_only:
                params = [(m.weight, 0 if m.transposed else 1)]
        elif isinstance(m, nn.Linear):
            if is_out:
                params = [(m.weight, 0), (m.bias, 0)]
            elif not outputs_only:
                params = [(m.weight, 1)]
        elif isinstance(m, _NORMS):
            params = [(getattr(m, "weight", None), 0), (getattr(m, "bias", None), 0)]
        for p, dim in params:
            if p is None or p.dim() <= dim or (p.dim() == 1 and len(idxs) > p.shape[0]):
                continue
            if p.dim() == 1 and isinstance(m, _NORMS) and p.shape[0] != _norm_width(m):
                continue
            found.setdefault((id(p), dim), (p, dim, idxs, list(roots)))
    return [
        (p, dim, torch.tensor(idxs, dtype=torch.long), torch.tensor(roots, dtype=torch.long))
        for p, dim, idxs, roots in found.values()
    ]


def _norm_width(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1]) if len(m.normalized_shape) == 1 else -1
    return int(getattr(m, "num_features", 0) or getattr(m, "num_channels", 0))


def dead_channels(graph: Any, group: Any, width: int) -> torch.Tensor:
    """Channels of ``group`` whose output is exactly zero, from their producer slices.

    Where normalisation layers cover a channel, it is dead when their scales and shifts are
    all zero (whatever the layer before them computes); elsewhere when every producer slice
    is zero.
    """
    norms = group_slices(graph, group, select="norms")
    covered = torch.zeros(width, dtype=torch.bool)
    for _p, _dim, _idxs, roots in norms:
        covered[roots] = True
    norm_zero = channel_norms(norms, width) == 0
    output_zero = channel_norms(group_slices(graph, group, select="outputs"), width) == 0
    return torch.where(covered, norm_zero, output_zero)


def channel_norms(slices: list[Slice], width: int) -> torch.Tensor:
    """L2 norm of every root channel over all the slices it owns."""
    total = torch.zeros(width, dtype=torch.float64)
    for p, dim, idxs, roots in slices:
        part = p.detach().index_select(dim, idxs.to(p.device)).movedim(dim, 0)
        squares = part.reshape(part.shape[0], -1).double().pow(2).sum(dim=1).cpu()
        total.scatter_add_(0, roots, squares)
    return total.sqrt()
