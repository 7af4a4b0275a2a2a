"""The sparsity penalty a training loop applies: `SparsityRegularizer`, which `SparsityTraining`
drives from the library's loop and a user drives from their own (``penalty()`` into the loss,
``step()`` after each optimizer step), and the channel scales it acts on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ModelError, UserError
from ..models.layers import WEIGHTED_LAYERS, find_head, has_batchnorm, unwrap_parallel
from ..stage import check_float, check_int
from .engine import failing_groups, make_plan
from .plan import GroupPlan, Slice, group_slices, planned_group
from .planning import evaluating

if TYPE_CHECKING:
    from .planning import PruningPlan

NAME = "SparsityRegularizer"
NEAR_ZERO = 0.01  # a channel is "near zero" below 1% of its layer's largest channel scale


class SparsityRegularizer:
    """The sparsity penalty of `SparsityTraining`, for any training loop.

    With a ``plan`` (`compressor.plan_pruning`), the channels the plan removes are driven to
    exactly zero by growing regularisation in proximal form (Wang et al., ICLR 2021,
    https://arxiv.org/abs/2012.09243): after each optimizer step, `step` shrinks each
    scheduled channel (all the slices it owns in its coupled group) by a share of its
    starting L2 norm that grows until the channels reach zero at ``ramp`` of
    ``total_steps``; from then on they are held at zero while the rest of the network adapts.
    `penalty` is a light uniform L1 pressure on every channel scale (the BatchNorm gammas,
    or each output channel's weight norm where there is no BatchNorm), weighted by ``l1``,
    to add to the loss. Without a plan (or for a model torch-pruning cannot trace whole)
    only the L1 penalty acts: network slimming (Liu et al. 2017,
    https://arxiv.org/abs/1708.06519); `method` says which and `note` why.

    The shrinkage acts on the parameters themselves, after the optimizer's update, so it
    works with any optimizer, learning-rate schedule, ``torch.autocast`` and ``GradScaler``,
    gradient accumulation (call `step` once per optimizer step) and DDP (every rank applies
    the same update to the same weights; pass the module DDP wraps, or the wrapper).

    Example:
        >>> reg = cz.SparsityRegularizer(model, plan, total_steps=len(loader) * epochs)
        >>> loss = F.cross_entropy(model(x), y) + reg.penalty()   # doctest: +SKIP
        >>> loss.backward(); optimizer.step(); reg.step()          # doctest: +SKIP

    Args:
        model: the model being trained (the plan's model, or one of the same structure).
        plan: the pruning plan whose channels go to zero; None: the L1 penalty alone.
        total_steps: optimizer steps the training takes (>= 1); `step` counts them.
        ramp: share of ``total_steps`` over which the scheduled channels reach zero, in (0, 1].
        l1: weight of the uniform L1 penalty (0 turns it off).
        example_input: without a plan, one input batch, to find the output head (which the
            L1 penalty leaves alone in a model without BatchNorm).
        threads: CPU threads a latency-aware plan times layers on (default: every core).

    Raises:
        ModelError: the plan was made for a model of another structure.
        UserError: a bad ``total_steps``, ``ramp`` or ``l1``.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: PruningPlan | None,
        total_steps: int,
        *,
        ramp: float = 0.25,
        l1: float = 1e-4,
        example_input: Any = None,
        threads: int | None = None,
    ) -> None:
        check_int(NAME, "total_steps", total_steps, minimum=1)
        check_float(NAME, "ramp", ramp, low=0.0, high=1.0, low_open=True)
        check_float(NAME, "l1", l1, low=0.0)
        model = unwrap_parallel(model)
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module (got: {type(model).__name__})")
        self.total_steps = total_steps
        self.ramp = ramp
        self.l1 = l1
        self.steps_taken = 0
        self.plan = plan
        self.note = ""
        self.layers: list[nn.Module] = []
        self.growing: GrowingPenalty | None = None
        with evaluating(model):  # tracing must not move BatchNorm statistics
            if plan is not None:
                plan.check_model(model)
                example = plan.example_input
                self.layers = channel_scale_layers(model, example)
                if plan.traceable:
                    self.growing = scheduled(model, example, plan, ramp, threads)
                if self.growing is None:
                    self.note = plan.why_not_scheduled or "the pruning plan removes no channel"
            else:
                self.layers = channel_scale_layers(model, example_input)
                self.note = "no pruning plan, so no channels are scheduled"
        self.start_scales = channel_scales(self.layers)

    @property
    def method(self) -> str:
        """``growing`` (the plan's channels driven to zero) or ``l1`` (the penalty alone)."""
        return "growing" if self.growing is not None else "l1"

    def penalty(self) -> torch.Tensor:
        """``l1`` x the sum of every channel scale: add it to the loss before ``backward``."""
        if not self.l1:
            return self.layers[0].weight.new_zeros(())
        return self.l1 * sum(s.sum() for s in channel_scales(self.layers, detach=False))

    def add_penalty_gradient(self) -> None:
        """Add `penalty`'s gradient to the parameters' (for a framework that owns the loss:
        call it after the gradients are unscaled and accumulated, before the optimizer step)."""
        if self.l1:
            with torch.enable_grad():
                self.penalty().backward()

    @torch.no_grad()
    def step(self) -> None:
        """Advance one optimizer step: shrink the scheduled channels (call after
        ``optimizer.step()``, once per step).

        Raises:
            UserError: stepped more than ``total_steps`` times.
        """
        if self.steps_taken >= self.total_steps:
            msg = (
                f"{NAME} stepped {self.steps_taken + 1} times, past its "
                f"total_steps={self.total_steps}: give total_steps the number of optimizer "
                "steps the training takes (len(loader) * epochs / accumulation)"
            )
            raise UserError(msg)
        self.steps_taken += 1
        if self.growing is not None:
            self.growing(self.steps_taken, self.total_steps)

    def after_step(self, step: int, total: int) -> None:
        """`step` as `compressor.training.loop.train` calls it (``total`` known only there)."""
        self.total_steps = max(total, step)
        self.step()

    def report(self) -> dict[str, Any]:
        """What the penalty did: the channel scales before and now, and, with a plan, how
        far the scheduled channels got."""
        after = channel_scales(self.layers)
        use_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.layers)
        found: dict[str, Any] = {
            "method": self.method,
            "penalty_on": "batchnorm_scale" if use_bn else "channel_l2_norm",
            "channels": sum(int(s.numel()) for s in after),
            "near_zero_fraction_before": near_zero_fraction(self.start_scales),
            "near_zero_fraction": near_zero_fraction(after),
            "mean_scale_before": _mean(self.start_scales),
            "mean_scale": _mean(after),
            "near_zero_rule": f"scale < {NEAR_ZERO:g} x the layer's largest",
            "steps": self.steps_taken,
        }
        if self.growing is not None and self.plan is not None:
            found.update(self.growing.report())
            found["target"] = self.plan.target_record()
        return found


class GrowingPenalty:
    """Proximal group-lasso steps on the scheduled channels, growing until they are zero.

    Called after every optimizer step with ``(step, total)``. Up to step ``ramp * total``
    each scheduled channel's parameters (all the slices it owns in its coupled group) are
    shrunk by ``n0 * 2 * step / T**2`` in L2 norm (``n0``: its norm at the start, ``T``:
    the ramp's steps), which adds up to more than ``n0`` by step ``T``; from then on they
    are held at exactly zero.
    """

    def __init__(self, entries: list[Slice], channels: int, ramp: float) -> None:
        self.entries = entries
        self.channels = channels
        self.ramp = ramp
        self.start = self.norms()

    def norms(self) -> torch.Tensor:
        """The current L2 norm of every scheduled channel."""
        total: torch.Tensor | None = None
        for p, dim, idxs, pos in self.entries:
            part = p.detach().index_select(dim, idxs.to(p.device)).movedim(dim, 0)
            squares = part.reshape(part.shape[0], -1).float().pow(2).sum(dim=1)
            if total is None:
                total = torch.zeros(self.channels, device=p.device)
            total.index_add_(0, pos.to(p.device), squares)
        return (total if total is not None else torch.zeros(self.channels)).sqrt()

    def __call__(self, step: int, total: int) -> None:
        ramp_steps = max(1, round(self.ramp * total))
        current = self.norms()
        if step >= ramp_steps:
            factor = torch.zeros_like(current)
        else:
            shrink = self.start.to(current.device) * (2 * step / ramp_steps**2)
            factor = (1 - shrink / current.clamp(min=1e-30)).clamp(min=0)
        for p, dim, idxs, pos in self.entries:
            where = idxs.to(p.device)
            shape = [1] * p.dim()
            shape[dim] = -1
            scaled = p.data.index_select(dim, where) * factor[pos.to(p.device)].view(shape)
            p.data.index_copy_(dim, where, scaled.to(p.dtype))

    def report(self) -> dict[str, Any]:
        """How far the scheduled channels got, for the stage's report row."""
        now = self.norms().cpu()
        start = float(self.start.sum())
        return {
            "ramp": self.ramp,
            "scheduled_channels": self.channels,
            "scheduled_scale_remaining": round(float(now.sum()) / start, 6) if start else 0.0,
            "scheduled_zero_fraction": round(float((now == 0).float().mean()), 4)
            if self.channels
            else 0.0,
        }


def scheduled(
    model: nn.Module, example: Any, plan: PruningPlan, ramp: float, threads: int | None = None
) -> GrowingPenalty | None:
    """The growing penalty on the channels ``plan`` removes from ``model`` (None if none):
    the plan's groups found again in ``model``'s own parameters, less the groups pruning
    would leave whole (its check fails for them)."""
    options = plan.options
    groups: GroupPlan
    groups, pruner, _ = make_plan(model, example, options, threads)
    failing = failing_groups(model, example, options, threads)
    groups.groups = [g for g in groups.groups if g.root not in failing]
    graph = pruner.DG
    modules = dict(model.named_modules())
    entries: list[Slice] = []
    offset = 0
    for planned in groups.groups:
        group = planned_group(graph, modules[planned.root], planned)
        where = {r: offset + i for i, r in enumerate(planned.remove)}
        for p, dim, idxs, roots in group_slices(graph, group):
            pos = torch.tensor([where[int(r)] for r in roots], dtype=torch.long)
            entries.append((p, dim, idxs, pos))
        offset += len(planned.remove)
    return GrowingPenalty(entries, offset, ramp) if offset else None


def channel_scale_layers(model: nn.Module, example_input: Any) -> list[nn.Module]:
    """The layers whose per-channel scales the penalty acts on (BatchNorms, else every
    Conv/Linear but the output head: found by running ``example_input``, or the last
    layer registered when there is none)."""
    if has_batchnorm(model):
        return [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        ]
    layers = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no Conv, Linear or BatchNorm layer")
    head = find_head(model, example_input) if example_input is not None else layers[-1]
    modules = dict(model.named_modules())
    return [modules[n] for n in layers if n != head]


def channel_scales(layers: list[nn.Module], *, detach: bool = True) -> list[torch.Tensor]:
    """Per-channel scale of each layer: |gamma| for BatchNorm, the weight L2 norm otherwise."""
    scales = []
    for layer in layers:
        weight = layer.weight.detach() if detach else layer.weight
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            scales.append(weight.abs())
        else:
            scales.append(weight.flatten(1).norm(dim=1))
    return scales


def near_zero_fraction(scales: list[torch.Tensor]) -> float:
    """Share of channels whose scale is below `NEAR_ZERO` times their layer's largest."""
    near = total = 0
    for s in scales:
        if s.numel():
            near += int((s < NEAR_ZERO * s.max()).sum())
            total += s.numel()
    return round(near / total, 4) if total else 0.0


def _mean(scales: list[torch.Tensor]) -> float:
    flat = torch.cat([s.flatten() for s in scales]) if scales else torch.zeros(0)
    return round(float(flat.mean()), 6) if flat.numel() else 0.0
