"""SparsityTraining: fine-tune with a penalty that drives the channels pruning removes to zero
(the library's loop driving `compressor.pruning.regularizer.SparsityRegularizer`)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..models.adapters import restructure
from ..models.layers import has_batchnorm
from ..stage import Stage, check_choice, check_float, check_int, register_stage
from ..training import distributed
from ..training.loop import OPTIMIZERS, recalibrate_batchnorm, train
from ..training.teacher import teacher_loss
from .latency_table import adopt_timings, layer_slopes, timings
from .planning import PruningPlan, plan_for, untraceable_reason
from .regularizer import SparsityRegularizer
from .structured import StructuredPruning

if TYPE_CHECKING:
    from ..stage import RunContext, State

METHODS = ("growing", "l1")
BN_RECALIBRATION_BATCHES = 32


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
    pruning then removes channels that are already zero, at no cost in accuracy. The penalty
    is `compressor.pruning.regularizer.SparsityRegularizer` (``cz.SparsityRegularizer``),
    which a user's own training loop can drive the same way.

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
            task's loss); 0 trains on the labels alone (and the teacher never runs).
        temperature: softmax temperature of those soft targets (> 0).
    """

    epochs: int = 2
    l1: float = 1e-4
    lr: float = 0.01
    optimizer: str = "auto"
    method: str = "growing"
    ramp: float = 0.25
    alpha: float = 0.7
    temperature: float = 4.0

    name = "sparsity_training"
    phase = "training"
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
        """Fine-tune a copy of ``state.model`` with the penalty (`SparsityRegularizer`)."""
        model = copy.deepcopy(state.model)
        example = state.example_input
        target = next((s for s in ctx.upcoming if isinstance(s, StructuredPruning)), None)
        if target is not None:
            restructure(model, example)  # as pruning will: the same channels
        plan, why = None, ""
        if self.method == "growing":
            plan, why = _stage_plan(model, example, target, ctx)
        reg = SparsityRegularizer(
            model,
            plan,
            total_steps=1,  # the loop sets it (`after_step`)
            ramp=self.ramp,
            l1=self.l1,
            example_input=example,
            threads=ctx.threads,
        )
        notes: list[str] = []
        if self.method == "growing" and reg.growing is None:
            notes.append(
                f"sparsity_training: {why or reg.note}; used the uniform L1 penalty instead"
            )
            ctx.log(notes[-1])
        record: dict[str, Any] = {}
        with teacher_loss(
            state.teacher,
            ctx,
            example,
            temperature=self.temperature,
            alpha=self.alpha,
            extra=reg.penalty if self.l1 else None,
        ) as compute_loss:
            history = train(
                model,
                ctx,
                epochs=self.epochs,
                lr=self.lr,
                optimizer_kind=self.optimizer,
                compute_loss=compute_loss,
                desc=ctx.step,
                after_step=reg.after_step if reg.growing else None,
                record=record,
            )
        sparsity = reg.report()
        if reg.growing and has_batchnorm(model):
            # The running statistics trail the ramp's changes; refresh them, as pruning would.
            seen = recalibrate_batchnorm(model, ctx.train_data, BN_RECALIBRATION_BATCHES)
            distributed.same_buffers(model)  # each rank saw its own share: take rank 0's
            sparsity["bn_recalibration_samples"] = seen
        sparsity["alpha"] = self.alpha  # the diagnosis's advice reads it
        details: dict[str, Any] = {"sparsity": sparsity, "train_loss": history, **record}
        if notes:
            details["notes"] = notes
        return state.replace(model=model, details=details)


def _stage_plan(
    model: nn.Module, example: Any, target: StructuredPruning | None, ctx: RunContext
) -> tuple[PruningPlan | None, str]:
    """The plan of the pruning stage that follows, for ``model``; or None and why not.

    A target is resolved here as the pruning stage will resolve it (under torchrun rank 0
    alone searches and every rank takes its ratio), so both stages aim at one ratio."""
    if target is None:
        return None, "no structured_pruning stage follows, so no channels are scheduled"
    why = untraceable_reason(model)
    if why:
        return None, why
    aimed_at, choice = target.target, None
    options = target
    if aimed_at:
        ctx.log(f"{ctx.step}: searching the ratio that meets {aimed_at[0]}")
        if distributed.active():  # rank 0 alone searches (timings undisturbed), all take it
            found, search = (
                target.resolve(model, example, ctx) if distributed.rank() == 0 else (None, None)
            )
            ratio, importance, choice = distributed.share(
                found and (found.ratio, found.importance, search and search.importance)
            )
            options = dataclasses.replace(target.at_ratio(ratio), importance=importance)
        else:
            options, search = target.resolve(model, example, ctx)
            choice = search and search.importance
    if options.latency_aware and distributed.active():  # every rank plans from rank 0's table
        if distributed.rank() == 0:
            layer_slopes(model, example, options.target_runtime, ctx.threads)
        adopt_timings(distributed.share(timings() if distributed.rank() == 0 else None))
    plan = plan_for(
        model, example, options, target=aimed_at, importance_choice=choice, threads=ctx.threads
    )
    if not plan.removed_channels:
        return None, "the pruning plan removes no channel"
    return plan, ""
