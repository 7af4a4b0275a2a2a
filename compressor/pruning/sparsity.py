"""SparsityTraining: fine-tune with a penalty that drives the channels pruning removes to zero."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.adapters import restructure, untraceable_blocks
from ..models.layers import WEIGHTED_LAYERS, find_head, has_batchnorm
from ..stage import Stage, check_choice, check_float, check_int, register_stage
from ..training import distributed
from ..training.loop import OPTIMIZERS, recalibrate_batchnorm, train
from ..training.teacher import teacher_loss
from .engine import failing_groups, make_plan
from .latency_table import adopt_timings, layer_slopes, timings
from .plan import Slice, group_slices, planned_group
from .structured import StructuredPruning

if TYPE_CHECKING:
    from ..stage import RunContext, State

METHODS = ("growing", "l1")
BN_RECALIBRATION_BATCHES = 32
NEAR_ZERO = 0.01  # a channel is "near zero" below 1% of its layer's largest channel scale


@register_stage("sparsity_training")
@dataclass(frozen=True)
class SparsityTraining(Stage):
    """Sparsity-regularised fine-tuning aimed at the channels the next pruning removes.

    ``method="growing"`` (the default) computes the plan of the `StructuredPruning` stage
    that follows (same coupled channel groups, importance and allocation; see
    `compressor.pruning.plan`) and applies a group-lasso penalty to the scheduled channels
    only, as proximal (soft-threshold) steps after each optimizer step, whose strength grows
    until they reach exactly zero at ``ramp`` of the fine-tune; they are then held at zero
    while the rest of the network adapts. This is growing regularisation (Wang et al., ICLR
    2021, https://arxiv.org/abs/2012.09243) in proximal form. Each channel's shrinkage is a
    share of its own starting norm, so the strength needs no tuning per model or loss. The
    pruning then removes channels that are already zero, at no cost in accuracy.

    ``method="l1"`` is plain network slimming (Liu et al. 2017,
    https://arxiv.org/abs/1708.06519): ``L = L0 + l1 * sum(channel scales)`` on every
    channel, where the scales are the BatchNorm gammas, or the L2 norms of each output
    channel's weights in every Conv/Linear but the head where there is no BatchNorm.

    Args:
        epochs: passes over the training data.
        l1: weight of the uniform L1 penalty on all channel scales (both methods; with
            ``growing`` it is a light extra pressure, 0 turns it off).
        lr: initial learning rate (cosine decay to zero; AdamW runs at ``lr`` x 0.02).
        optimizer: ``auto`` (AdamW for a transformer, SGD with Nesterov momentum else),
            ``probe`` (the one a short trial finds fine-tunes this model best, see
            `compressor.training.loop.probe_optimizer`), ``sgd`` or ``adamw``.
        method: ``growing`` or ``l1`` (see above). With no `StructuredPruning` after this
            stage, or a model torch-pruning cannot trace whole, ``growing`` acts as ``l1``
            and the report says so.
        ramp: share of the training steps over which the penalty on the scheduled channels
            grows until they reach zero, in (0, 1].
        alpha: weight of the original model's soft targets in the loss while the channels
            are driven to zero, in [0, 1] (as `Distillation`'s; ``1 - alpha`` weighs the
            task's loss); 0 trains on the labels alone.
        temperature: softmax temperature of those soft targets (> 0).
    """

    epochs: int = 2
    l1: float = 1e-4
    lr: float = 0.01
    optimizer: str = "auto"
    method: str = "growing"
    ramp: float = 0.5
    alpha: float = 0.0
    temperature: float = 4.0

    name = "sparsity_training"
    trains = True
    prepares = True

    def __post_init__(self) -> None:
        check_int(self.name, "epochs", self.epochs, minimum=1)
        check_float(self.name, "l1", self.l1, low=0.0)
        check_float(self.name, "lr", self.lr, low=0.0, low_open=True)
        check_choice(self.name, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(self.name, "method", self.method, METHODS)
        check_float(self.name, "ramp", self.ramp, low=0.0, high=1.0, low_open=True)
        check_float(self.name, "alpha", self.alpha, low=0.0, high=1.0)
        check_float(self.name, "temperature", self.temperature, low=0.0, low_open=True)

    def apply(self, state: State, ctx: RunContext) -> State:
        """Fine-tune a copy of ``state.model`` with the penalty."""
        model = copy.deepcopy(state.model)
        if any(isinstance(s, StructuredPruning) for s in ctx.upcoming):
            restructure(model, state.example_input)  # as pruning will: the same channels
        layers = channel_scale_layers(model, state.example_input)
        use_bn = has_batchnorm(model)
        before = channel_scales(layers)
        notes: list[str] = []
        growing = None
        if self.method == "growing":
            growing, why = _growing_penalty(model, state.example_input, ctx, self.ramp)
            if growing is None:
                notes.append(f"sparsity_training: {why}; used the uniform L1 penalty instead")
                ctx.log(notes[-1])

        def penalty() -> torch.Tensor:
            return self.l1 * sum(scales.sum() for scales in channel_scales(layers, detach=False))

        record: dict[str, Any] = {}
        with teacher_loss(
            state.teacher,
            ctx,
            state.example_input,
            temperature=self.temperature,
            alpha=self.alpha,
            extra=penalty if self.l1 else None,
        ) as compute_loss:
            history = train(
                model,
                ctx,
                epochs=self.epochs,
                lr=self.lr,
                optimizer_kind=self.optimizer,
                compute_loss=compute_loss,
                desc=ctx.step,
                after_step=growing,
                record=record,
            )
        recalibrated = 0
        if growing and use_bn:
            # The running statistics trail the ramp's changes; refresh them, as pruning would.
            recalibrated = recalibrate_batchnorm(model, ctx.train_data, BN_RECALIBRATION_BATCHES)
            distributed.same_buffers(model)  # each rank saw its own share: take rank 0's
        after = channel_scales(layers)
        sparsity: dict[str, Any] = {
            "method": "growing" if growing else "l1",
            "penalty_on": "batchnorm_scale" if use_bn else "channel_l2_norm",
            "channels": sum(int(s.numel()) for s in after),
            "near_zero_fraction_before": near_zero_fraction(before),
            "near_zero_fraction": near_zero_fraction(after),
            "mean_scale_before": _mean(before),
            "mean_scale": _mean(after),
            "near_zero_rule": f"scale < {NEAR_ZERO:g} x the layer's largest",
        }
        if growing:
            sparsity.update(growing.report())
            sparsity["bn_recalibration_samples"] = recalibrated
        details: dict[str, Any] = {"sparsity": sparsity, "train_loss": history, **record}
        if notes:
            details["notes"] = notes
        return state.replace(model=model, details=details)


class GrowingPenalty:
    """Proximal group-lasso steps on the scheduled channels, growing until they are zero.

    Called after every optimizer step with ``(step, total)``. Up to step ``ramp * total``
    each scheduled channel's parameters (all the slices it owns in its coupled group) are
    shrunk by ``n0 * 2 * step / T**2`` in L2 norm (``n0``: its norm at the start, ``T``:
    the ramp's steps), which adds up to more than ``n0`` by step ``T``; from then on they
    are held at exactly zero.
    """

    def __init__(self, entries: list[Slice], channels: int, ramp: float, plan: Any) -> None:
        self.entries = entries
        self.channels = channels
        self.ramp = ramp
        self.plan = plan
        self.aimed_at: dict[str, Any] | None = None  # the pruning target it was resolved for
        self.importance_choice: dict[str, Any] | None = None  # what `auto` tried there
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
            "target": {
                "ratio": self.plan.allocation.ratio,
                "importance": self.plan.importance,
                **({"pruning_target": self.aimed_at} if self.aimed_at else {}),
                **({"importance_choice": self.importance_choice} if self.importance_choice else {}),
                **self.plan.summary(),
            },
            "scheduled_channels": self.channels,
            "scheduled_scale_remaining": round(float(now.sum()) / start, 6) if start else 0.0,
            "scheduled_zero_fraction": round(float((now == 0).float().mean()), 4)
            if self.channels
            else 0.0,
        }


def _growing_penalty(
    model: nn.Module, example: torch.Tensor, ctx: RunContext, ramp: float
) -> tuple[GrowingPenalty | None, str]:
    """The penalty aimed at the plan of the next pruning stage, or None and why not."""
    target = next((s for s in ctx.upcoming if isinstance(s, StructuredPruning)), None)
    if target is None:
        return None, "no structured_pruning stage follows, so no channels are scheduled"
    blocks = untraceable_blocks(model)
    if blocks:
        what = " and ".join(sorted(set(blocks.values())))
        return None, f"torch-pruning cannot trace the {what} of {type(model).__name__} whole"
    aimed_at = target.target
    if aimed_at:
        ctx.log(f"{ctx.step}: searching the ratio that meets {aimed_at[0]}")
        if distributed.active():  # rank 0 alone searches (timings undisturbed), all take it
            found, search = (
                target.resolve(model, example, ctx) if distributed.rank() == 0 else (None, None)
            )
            ratio, importance, choice = distributed.share(
                found and (found.ratio, found.importance, search and search.importance)
            )
            target = dataclasses.replace(target.at_ratio(ratio), importance=importance)
        else:
            target, search = target.resolve(model, example, ctx)
            choice = search and search.importance
    if target.latency_aware and distributed.active():  # every rank plans from rank 0's table
        if distributed.rank() == 0:
            layer_slopes(model, example, target.target_runtime, ctx.threads)
        adopt_timings(distributed.share(timings() if distributed.rank() == 0 else None))
    plan, pruner, _ = make_plan(model, example, target, ctx.threads)
    failing = failing_groups(
        model, example, target, ctx.threads
    )  # pruning would keep these: spare them
    plan.groups = [g for g in plan.groups if g.root not in failing]
    graph = pruner.DG
    modules = dict(model.named_modules())
    entries: list[Slice] = []
    offset = 0
    for planned in plan.groups:
        group = planned_group(graph, modules[planned.root], planned)
        where = {r: offset + i for i, r in enumerate(planned.remove)}
        for p, dim, idxs, roots in group_slices(graph, group):
            pos = torch.tensor([where[int(r)] for r in roots], dtype=torch.long)
            entries.append((p, dim, idxs, pos))
        offset += len(planned.remove)
    if not offset:
        return None, "the pruning plan removes no channel"
    penalty = GrowingPenalty(entries, offset, ramp, plan)
    if aimed_at:  # the pruning stage tries this ratio first (`StructuredPruning.apply`)
        penalty.aimed_at = {"option": aimed_at[0], "value": aimed_at[1]}
        penalty.importance_choice = choice
    return penalty, ""


def channel_scale_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layers whose per-channel scales the penalty acts on (BatchNorms, else Conv/Linear)."""
    if has_batchnorm(model):
        return [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        ]
    head = find_head(model, example_input)
    return [m for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS) and n != head]


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
