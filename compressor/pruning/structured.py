"""StructuredPruning: remove whole channels through torch-pruning's dependency graph."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import data_subset
from ..errors import ModelError, RecipeError, first_line
from ..inputs import call
from ..models.adapters import (
    adapter_for,
    after_pruning,
    attention_blocks,
    describe,
    layers_left_whole,
    restructure,
    restructured,
    untraceable_blocks,
)
from ..models.layers import call_naming_layer, execution_order, find_head, has_batchnorm
from ..models.model_io import SelectOutput
from ..runtime.measure import EvalFn, count_params_macs, default_threads, torch_predictor
from ..runtime.runtimes import ONNX_RUNTIMES
from ..stage import Stage, check_bool, check_choice, check_float, check_int, register_stage
from ..training.loop import recalibrate_batchnorm
from .check import apply_checked
from .latency_table import latency_costs
from .plan import (
    IMPORTANCES,
    Allocation,
    PlannedGroup,
    PruningPlan,
    apply_plan,
    auto_importances,
    plan_pruning,
    resolve_importance,
)
from .sensitivity import measure_sensitivity
from .target import TARGETS, TargetSearch, parse_amount, search_target

AUTO_SAMPLES = 256  # eval inputs that score each importance `auto` tries at a target

if TYPE_CHECKING:
    from ..row import Row
    from ..stage import RunContext, State


@register_stage("structured_pruning")
@dataclass(frozen=True)
class StructuredPruning(Stage):
    """Remove the least important channels for real: tensors shrink, params and MACs fall.

    Coupled layers (residual adds, concatenations, depthwise convs, flatten -> Linear) are
    pruned together through torch-pruning's DepGraph (Fang et al. 2023,
    https://arxiv.org/abs/2301.12900). The output head is always left whole. The channels
    are chosen by `compressor.pruning.plan`, the plan `SparsityTraining` drives to zero
    when it runs before this stage; channels already exactly zero always go first.

    Instead of ``ratio``, one target may be given (see `compressor.pruning.target`): the
    ratio is then searched until the pruned model is within it, and the report's
    ``details.pruning.target`` shows the target, what was reached and every candidate.

    Args:
        ratio: share of the prunable channels removed (0.5 when neither it nor a target is
            given). With ``global_pruning`` (the default) it is counted over all coupled
            channel groups together, and each group loses between 0 and ``max_layer_ratio``
            of its channels by score (network slimming's global threshold); without it
            every group loses ``ratio`` of its channels.
            Params and MACs fall by about ``1 - (1 - ratio)**2``.
        importance: how channels are ranked. ``auto`` is ``bn_scale`` (|BatchNorm gamma|) when
            the model has BatchNorm and ``l2`` (group weight norm) otherwise, the quantities
            `SparsityTraining` drives toward zero; with a target, the more accurate of that
            and ``lamp`` at the target (`_choose_importance`); also ``l1``, ``lamp``,
            ``fpgm``, ``random``.
        ignored_layers: names of further layers to leave whole (e.g. ``["features.0"]``).
        round_to: keep channel counts a multiple of this (INT8 kernels run faster at multiples
            of 8 or 16); ``null`` for no rounding. A group keeps at least ``round_to``
            channels; one no wider than that is left whole.
        global_pruning: rank channels across all groups (true) or remove the same share of
            every group (false, uniform).
        attention_heads: in attention layers (found by `compressor.models.adapters`), remove
            ``whole`` heads (the default: every kept head computes what it did) or the same
            ``dims`` of every head (the head count stays).
        max_layer_ratio: with ``global_pruning``, the largest share of one group's channels
            that may go; ``null``: halfway between ``ratio`` and 1, so no group keeps less
            than half the share an average group keeps.
        target_macs: prune until the model has at most this many MACs (a number, or text
            like ``150M``).
        target_params: prune until the model has at most this many parameters.
        target_size_mb: prune until the artifact (the INT8 file when an `Int8Quantization`
            follows, else the FP32 ONNX file) is at most this many MB (10**6 bytes).
        target_latency_ms: prune until the artifact's batch-1 median latency in
            ``target_runtime``, measured on this machine with the run's threads, is at most
            this many milliseconds.
        target_runtime: the runtime ``target_latency_ms`` is measured in: ``onnxruntime``
            or ``openvino``.
        bn_recalibration_batches: after pruning, re-estimate BatchNorm statistics on this
            many training batches (0: don't), with only the BatchNorm layers in training
            mode. Removing live channels shifts later layers' input distributions.
        sensitivity: before pruning, measure each channel group's accuracy drop when it
            alone loses 25, 50 and 75% of its channels (`pruning_sensitivity`), on
            ``sensitivity_samples`` eval inputs; the report charts it.
        sensitivity_samples: eval inputs the sensitivity is measured on.
        latency_aware: with ``global_pruning``, rank channels by importance per millisecond
            their removal saves: every Conv2d and Linear is timed alone, INT8, in
            ``target_runtime`` at a few widths (`compressor.pruning.latency_table`), and each
            group's score is divided by its cost. ``details.pruning.latency_table`` shows it.
    """

    ratio: float | None = None
    importance: str = "auto"
    ignored_layers: tuple[str, ...] = ()
    round_to: int | None = 16
    global_pruning: bool = True
    attention_heads: str = "whole"
    max_layer_ratio: float | None = None
    bn_recalibration_batches: int = 32
    target_macs: float | None = None
    target_params: float | None = None
    target_size_mb: float | None = None
    target_latency_ms: float | None = None
    target_runtime: str = "onnxruntime"
    sensitivity: bool = False
    sensitivity_samples: int = 256
    latency_aware: bool = False

    name = "structured_pruning"
    replaces = {"ratio": tuple(TARGETS)} | {t: ("ratio", *TARGETS) for t in TARGETS}

    def __post_init__(self) -> None:
        for option in TARGETS:
            object.__setattr__(self, option, parse_amount(self.name, option, getattr(self, option)))
        targets = [o for o in TARGETS if getattr(self, o) is not None]
        if len(targets) > 1:
            msg = f"{self.name}: give one target, not {' and '.join(targets)}"
            raise RecipeError(msg)
        if targets and self.ratio is not None:
            msg = (
                f"{self.name}: give ratio ({self.ratio!r}) or {targets[0]}, not both "
                "(a target searches the ratio)"
            )
            raise RecipeError(msg)
        if self.ratio is None and not targets:
            object.__setattr__(self, "ratio", 0.5)
        if self.ratio is not None:
            check_float(
                self.name, "ratio", self.ratio, low=0.0, high=1.0, low_open=True, high_open=True
            )
        check_choice(self.name, "target_runtime", self.target_runtime, ONNX_RUNTIMES)
        check_choice(self.name, "importance", self.importance, IMPORTANCES)
        if self.ignored_layers is None:  # YAML's "ignored_layers:" with nothing after it
            object.__setattr__(self, "ignored_layers", ())
        if not isinstance(self.ignored_layers, (list, tuple)) or not all(
            isinstance(n, str) for n in self.ignored_layers
        ):
            msg = (
                f"{self.name}.ignored_layers must be a list of layer names "
                f"(got: {self.ignored_layers!r})"
            )
            raise RecipeError(msg)
        object.__setattr__(self, "ignored_layers", tuple(self.ignored_layers))
        if self.round_to is not None:
            check_int(self.name, "round_to", self.round_to, minimum=1)
        check_bool(self.name, "global_pruning", self.global_pruning)
        check_choice(self.name, "attention_heads", self.attention_heads, ("whole", "dims"))
        if self.max_layer_ratio is not None:
            check_float(
                self.name,
                "max_layer_ratio",
                self.max_layer_ratio,
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
            )
        check_int(self.name, "bn_recalibration_batches", self.bn_recalibration_batches, minimum=0)
        check_bool(self.name, "sensitivity", self.sensitivity)
        check_int(self.name, "sensitivity_samples", self.sensitivity_samples, minimum=1)
        check_bool(self.name, "latency_aware", self.latency_aware)
        if self.latency_aware and not self.global_pruning:
            msg = (
                f"{self.name}: latency_aware allocates channels across groups, which needs "
                "global_pruning: true (uniform allocation takes the same share of every group)"
            )
            raise RecipeError(msg)

    @property
    def target(self) -> tuple[str, float] | None:
        """The target option set and its value, or None (then ``ratio`` is used)."""
        return next(((o, getattr(self, o)) for o in TARGETS if getattr(self, o) is not None), None)

    def at_ratio(self, ratio: float) -> StructuredPruning:
        """These options with ``ratio`` set and no target."""
        return dataclasses.replace(self, ratio=ratio, **dict.fromkeys(TARGETS))

    def pruned_size(
        self, model: nn.Module, example: torch.Tensor, threads: int | None = None
    ) -> tuple[int, int]:
        """(params, MACs) of a copy of ``model`` pruned with these options (it is unchanged)."""
        pruned = _candidate(copy.deepcopy(model).cpu().eval(), example, self, threads)
        return count_params_macs(pruned, example)

    def resolve(
        self,
        model: nn.Module,
        example: torch.Tensor,
        ctx: RunContext | None = None,
        first: float | None = None,
    ) -> tuple[StructuredPruning, TargetSearch | None]:
        """These options with the ratio that meets the target on ``model``, and the search.

        Without a target: these options and None. ``model`` is not changed; measured
        targets (size, latency) need the run context. ``first`` is tried first and kept
        if it meets the target. With ``importance: auto`` and a run context, the importance
        is chosen too (`_choose_importance`); the options returned name it.
        """
        if self.target is None:
            return self, None
        ignored_modules(model, example, self.ignored_layers)  # a bad name fails here, once
        if self.importance == "auto" and ctx is not None:
            return self._choose_importance(model, example, ctx, first)
        return self._search(model, example, ctx, first)

    def _search(
        self, model: nn.Module, example: torch.Tensor, ctx: RunContext | None, first: float | None
    ) -> tuple[StructuredPruning, TargetSearch]:
        """The ratio search for the target with these options' importance."""
        assert self.target is not None
        option, value = self.target
        search = search_target(
            model,
            example,
            option,
            value,
            lambda m, r: _candidate(m, example, self.at_ratio(r), ctx.threads if ctx else None),
            ctx,
            self.target_runtime,
            first,
        )
        return self.at_ratio(search.ratio), search

    def _choose_importance(
        self, model: nn.Module, example: torch.Tensor, ctx: RunContext, first: float | None
    ) -> tuple[StructuredPruning, TargetSearch]:
        """``importance: auto`` with a target: each of `auto_importances` pruned to the
        target, its BatchNorms re-estimated, scored on `AUTO_SAMPLES` eval inputs; the
        best kept (the first on a tie). At one target the candidates cost the same, so the
        more accurate ranking is the better one; a model trained from scratch has
        BatchNorm scales that say little, and ranking by them can cost most of its
        accuracy where LAMP's per-layer normalised weights cost a little."""
        subset = data_subset(ctx.eval_data, AUTO_SAMPLES)
        trials: list[dict[str, Any]] = []
        best: tuple[float, StructuredPruning, TargetSearch] | None = None
        for name in auto_importances(model):
            options, search = dataclasses.replace(self, importance=name)._search(
                model, example, ctx, first
            )
            pruned = _candidate(copy.deepcopy(model).cpu().eval(), example, options, ctx.threads)
            if options.bn_recalibration_batches and has_batchnorm(pruned):
                recalibrate_batchnorm(pruned, ctx.train_data, options.bn_recalibration_batches)
            with torch.no_grad():
                score = float(ctx.eval_fn(torch_predictor(pruned), subset))
            trials.append({"importance": name, "ratio": round(search.ratio, 4), "score": score})
            ctx.log(f"{ctx.step}: importance {name} at the target: {score:.4f} before training")
            if best is None or score > best[0]:
                best = (score, options, search)
        assert best is not None
        _, options, search = best
        search.importance = {
            "chosen": options.importance,
            "trials": [{**t, "score": round(t["score"], 6)} for t in trials],
        }
        return options, search

    def allocation(self) -> Allocation:
        """The plan's allocation options."""
        assert self.ratio is not None, "resolve() a target before planning"
        return Allocation(
            ratio=self.ratio,
            global_allocation=self.global_pruning,
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
        )

    def apply(self, state: State, ctx: RunContext) -> State:
        """Prune a copy of ``state.model`` (to the target, when one is set)."""
        model = copy.deepcopy(state.model).cpu().eval()
        example = state.example_input
        sensitivity = None
        if self.sensitivity:
            ctx.log(f"{ctx.step}: measuring each channel group's pruning sensitivity")
            try:
                sensitivity = pruning_sensitivity(
                    model,
                    example,
                    ctx.eval_data,
                    samples=self.sensitivity_samples,
                    eval_fn=ctx.eval_fn,
                    options=self,
                )
            except ModelError as exc:
                warnings.warn(f"structured_pruning: {exc}", stacklevel=2)
                sensitivity = {"error": str(exc)}
        if self.target:
            ctx.log(f"{ctx.step}: searching the ratio that meets {self.target[0]}")
        options, first = self, None
        aimed = _aimed(state.rows, self.target)
        if aimed:  # the sparsity stage's ratio, and the importance it chose with `auto`
            first = aimed.get("ratio")
            if self.importance == "auto" and aimed.get("importance"):
                options = dataclasses.replace(self, importance=aimed["importance"])
        options, search = options.resolve(model, example, ctx, first)
        pruned, details = prune(model, example, options, threads=ctx.threads)
        if sensitivity is not None:
            details["pruning"]["sensitivity"] = sensitivity
        if search is not None:
            details["pruning"]["target"] = search.to_dict()
            missed = search.note()
            if missed:
                warnings.warn(f"structured_pruning: {missed}", stacklevel=2)
                details.setdefault("notes", []).append(missed)
        if self.bn_recalibration_batches and has_batchnorm(pruned):
            seen = recalibrate_batchnorm(pruned, ctx.train_data, self.bn_recalibration_batches)
            details["pruning"]["bn_recalibration_samples"] = seen
        return state.replace(model=pruned, details=details)


def pruning_sensitivity(
    model: nn.Module,
    example_input: torch.Tensor,
    data: Any,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    samples: int = 256,
    eval_fn: EvalFn | None = None,
    options: StructuredPruning | None = None,
) -> dict[str, Any]:
    """How much accuracy each coupled channel group loses when it alone is pruned.

    Every prunable group loses each of ``ratios`` of its lowest-ranked channels in turn
    (ranked and rounded as ``options`` say: importance, ``round_to``, ignored layers,
    attention heads; default ``StructuredPruning(round_to=None)``), and the model is
    evaluated with ``eval_fn`` (top-1) on the first ``samples`` inputs of ``data``. No
    BatchNorm recalibration or training follows: a ranking of what pruning costs where.
    ``model`` is not changed. The result is described in
    `compressor.pruning.sensitivity.measure_sensitivity`; the most sensitive group first.

    Raises:
        RecipeError: bad ratios or samples, or a layer name in ``options`` the model lacks.
        ModelError: a model torch-pruning cannot trace whole.
    """
    options = options or StructuredPruning(round_to=None)
    ignored_modules(model, example_input, options.ignored_layers)  # a bad name fails here

    def plan_at(work: nn.Module, ratio: float) -> tuple[PruningPlan, Any]:
        uniform = dataclasses.replace(options.at_ratio(ratio), global_pruning=False)
        plan, pruner, _ = make_plan(work, example_input, uniform)
        return plan, pruner

    found = measure_sensitivity(
        model, example_input, data, plan_at, ratios=ratios, samples=samples, eval_fn=eval_fn
    )
    found["importance"] = resolve_importance(options.importance, model)[0]
    return found


def _aimed(rows: Sequence[Row], target: tuple[str, float] | None) -> dict[str, Any] | None:
    """What a sparsity stage right before resolved ``target`` to (its ``ratio`` and
    ``importance``), if one did.

    Its channels are already zero, so pruning tries that ratio first, ranked the same way:
    a measured target's timing noise must not move the two stages apart.
    """
    if target is None:
        return None
    for row in reversed(rows):
        if row.name == "structured_pruning":
            return None
        aimed = ((row.details.get("sparsity") or {}).get("target")) or {}
        wanted = aimed.get("pruning_target") or {}
        if wanted.get("option") == target[0] and wanted.get("value") == target[1]:
            return aimed
    return None


def _candidate(
    model: nn.Module, example: torch.Tensor, options: StructuredPruning, threads: int | None
) -> nn.Module:
    """``model`` pruned in place at ``options`` for a target search (quietly; a ratio that
    removes no channel leaves it whole)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return prune(model, example, options, threads=threads)[0]
        except RecipeError:  # the ratio removes no channel (names were checked before)
            return model


def ignored_modules(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> list[str]:
    """The layer names pruning leaves whole: ``names`` and the output head.

    In a model the pipeline wrapped in `SelectOutput`, names may be given as in the user's
    own model (``classifier.4`` for ``model.classifier.4``).

    Raises:
        RecipeError: a name that the model does not have.
    """
    modules = dict(model.named_modules())
    if isinstance(model, SelectOutput):
        names = [n if n in modules or f"model.{n}" not in modules else f"model.{n}" for n in names]
    unknown = [n for n in names if n not in modules]
    if unknown:
        sample = ", ".join(n for n in list(modules)[1:8])
        msg = (
            f"structured_pruning.ignored_layers: the model has no layer {unknown[0]!r} "
            f"(layers are named like: {sample}, ...)"
        )
        raise RecipeError(msg)
    head = find_head(model, example)
    return list(dict.fromkeys([*names, *layers_left_whole(model), *([head] if head else [])]))


def make_plan(
    model: nn.Module,
    example: torch.Tensor,
    options: StructuredPruning,
    threads: int | None = None,
) -> tuple[PruningPlan, Any, list[str]]:
    """The plan ``options`` make for ``model``, its pruner, and the layers left whole.

    With ``latency_aware``, the layers are timed on ``threads`` (default: every core).

    Raises:
        ModelError: torch-pruning cannot trace the model.
    """
    ignored_names = ignored_modules(model, example, options.ignored_layers)
    modules = dict(model.named_modules())
    heads = {
        layer: info.heads
        for _n, _m, _a, info in attention_blocks(model)
        for layer in (info.layer, *info.also)
    }
    cost, table = None, None
    if options.latency_aware and options.global_pruning:
        runtime, cores = options.target_runtime, threads or default_threads()
        cost, table = latency_costs(model, example, runtime, cores)

    def build() -> tuple[PruningPlan, Any]:
        return plan_pruning(
            model,
            example,
            importance=options.importance,
            allocation=options.allocation(),
            ignored=[modules[n] for n in ignored_names],
            num_heads=heads,
            whole_heads=options.attention_heads == "whole",
            cost=cost,
        )

    try:
        plan, pruner = call_naming_layer(model, build, "torch-pruning")
    except (ModelError, RecipeError):
        raise
    except Exception as exc:
        msg = f"torch-pruning cannot prune {type(model).__name__}: {first_line(exc)}"
        raise ModelError(msg) from exc
    plan.latency_table = table
    return plan, pruner, ignored_names


def failing_groups(
    model: nn.Module,
    example: torch.Tensor,
    options: StructuredPruning,
    threads: int | None = None,
) -> set[str]:
    """Root layers of the planned groups that pruning would leave whole (its check fails).

    Found by pruning a copy; `SparsityTraining` leaves those channels alone.
    """
    trial = copy.deepcopy(model)
    plan, pruner, _ = make_plan(trial, example, options, threads)
    return {
        g.root
        for g in call_naming_layer(
            trial, lambda: apply_checked(trial, example, plan, pruner), "torch-pruning"
        )
    }


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    options: StructuredPruning,
    threads: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` in place as ``options`` say; return it and the report details.

    ``threads``: what a latency-aware plan times its layers on (default: every core).

    Raises:
        RecipeError: an ignored layer name that the model does not have.
        ModelError: torch-pruning cannot handle the model, or the pruned model fails to run.
    """
    params_before, macs_before = count_params_macs(model, example_input)
    restructure(model, example_input)  # e.g. attention heads untied from the residual width
    found = untraceable_blocks(model)
    blocks, what = list(found), " and ".join(sorted(set(found.values())))
    if blocks:
        ignored_names = ignored_modules(model, example_input, options.ignored_layers)
        importance_name, _ = resolve_importance(options.importance, model)
        details = _prune_around(
            model, example_input, options, importance_name, ignored_names, blocks
        )
        details["pruning"].update(_size_change(model, example_input, params_before, macs_before))
        _note_left_whole(model, details, blocks, what)
        return model, details
    with torch.no_grad():
        out_before = call(model, example_input)
    heads_before = [info.heads for _n, _m, _a, info in attention_blocks(model)]
    plan, pruner, ignored_names = make_plan(model, example_input, options, threads)
    if options.ratio > 0 and plan.removed_channels == 0:
        raise RecipeError(f"structured_pruning: {_nothing_removed(plan, options)}")

    def step() -> list[PlannedGroup]:
        failed = apply_checked(model, example_input, plan, pruner)
        after_pruning(model)
        return failed

    try:
        failed = call_naming_layer(model, step, "torch-pruning")
    except ModelError:
        raise
    except Exception as exc:
        msg = f"torch-pruning cannot prune {type(model).__name__}: {first_line(exc)}"
        raise ModelError(msg) from exc

    def forward() -> Any:
        with torch.no_grad():
            return call(model, example_input)

    out_after = call_naming_layer(model, forward, "the pruned model's forward pass")
    if _shape(out_after) != _shape(out_before):
        msg = f"pruning changed the output shape from {_shape(out_before)} to {_shape(out_after)}"
        raise ModelError(msg)
    details = {
        "pruning": {
            "importance": plan.importance,
            "ratio": options.ratio,
            "round_to": plan.allocation.round_to,
            **plan.summary(),
            "left_whole": ignored_names + [n for n in plan.left_whole if n not in ignored_names],
            "kept_at_round_to": plan.kept_at_round_to,
            "attention_heads": _heads_summary(model, heads_before, options),
            "adapters": describe(model),
            "restructured": _counts(restructured(model)),
            **_size_change(model, example_input, params_before, macs_before),
        }
    }
    if plan.latency_table is not None:
        details["pruning"]["latency_table"] = plan.latency_table
    shortfall = _shortfall(plan, options, failed)
    if shortfall:
        warnings.warn(f"structured_pruning: {shortfall}", stacklevel=2)
        details["notes"] = [shortfall]
    if failed:
        names = ", ".join(g.root for g in failed[:3]) + (", ..." if len(failed) > 3 else "")
        note = (
            f"{len(failed)} channel groups ({names}) were left whole: removing their channels "
            f"failed or changed what the kept channels compute (torch-pruning's index "
            f"mapping through a reshape, shuffle or split does not hold for this model)"
        )
        warnings.warn(f"structured_pruning: {note}", stacklevel=2)
        details.setdefault("notes", []).append(note)
    return model, details


def _nothing_removed(plan: PruningPlan, options: StructuredPruning) -> str:
    """Why a plan with ``ratio`` > 0 removes no channel, and what to change."""
    rounding = plan.allocation.round_to
    if plan.too_narrow and not plan.groups_seen:
        names = ", ".join(plan.too_narrow[:3]) + (", ..." if len(plan.too_narrow) > 3 else "")
        return (
            f"ratio {options.ratio} removes no channel: every layer pruning may touch "
            f"({names}) is no wider than round_to={rounding}; lower round_to"
        )
    if not plan.groups_seen:
        return (
            f"ratio {options.ratio} removes no channel: the model has no channel group "
            "pruning may touch (every layer is ignored, left whole by an adapter, or the head)"
        )
    return (
        f"ratio {options.ratio} with round_to={rounding} removes no channel: no layer can "
        f"lose a multiple of round_to channels within its share (at most "
        f"{plan.allocation.cap:.0%}); raise ratio or lower round_to"
    )


SHORTFALL = 0.05
"""Pruning that removes this much less than ``ratio`` (a share of the channels) says why."""


def _shortfall(plan: PruningPlan, options: StructuredPruning, failed: list[PlannedGroup]) -> str:
    """A sentence when pruning removed clearly less than ``ratio`` asked (and why), or ''."""
    if not plan.prunable_channels:
        return ""
    removed = (plan.removed_channels - sum(len(g.remove) for g in failed)) / (
        plan.prunable_channels
    )
    if removed >= options.ratio - SHORTFALL:
        return ""
    why = []
    narrow = plan.too_narrow
    if narrow:
        why.append(
            f"{len(narrow)} layers no wider than round_to={plan.allocation.round_to} were "
            f"left whole ({', '.join(narrow[:3])}{', ...' if len(narrow) > 3 else ''})"
        )
    if plan.kept_at_round_to:
        rounding = plan.allocation.round_to
        why.append(f"{len(plan.kept_at_round_to)} layers stopped at round_to={rounding} channels")
    if failed:
        why.append(f"{len(failed)} groups failed the check and were left whole")
    if options.global_pruning:
        why.append(f"no group may lose more than max_layer_ratio {plan.allocation.cap:.2f}")
    return (
        f"removed {removed:.0%} of the prunable channels where ratio asked {options.ratio:.0%}: "
        + "; ".join(why)
    )


def _counts(names: dict[str, str]) -> dict[str, int]:
    """Adapter name -> how many blocks it restructured."""
    counts: dict[str, int] = {}
    for adapter in names.values():
        counts[adapter] = counts.get(adapter, 0) + 1
    return counts


def _traceable_sequentials(model: nn.Module, blocks: list[str]) -> list[str]:
    """The outermost ``nn.Sequential`` modules that hold no untraceable block, by name."""
    found: list[str] = []
    for name, m in model.named_modules():
        inside_found = any(name.startswith(f + ".") for f in found)
        holds_block = not name or any(b == name or b.startswith(name + ".") for b in blocks)
        if isinstance(m, nn.Sequential) and not inside_found and not holds_block:
            found.append(name)
    return found


def _inputs_of(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """The input each named module gets in one forward pass (modules called once only)."""
    seen: dict[str, list[Any]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0] if len(args) == 1 else None)
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            call(model, example)
    finally:
        for h in handles:
            h.remove()
    return {
        n: got[0] for n, got in seen.items() if len(got) == 1 and isinstance(got[0], torch.Tensor)
    }


def _prune_around(
    model: nn.Module,
    example: torch.Tensor,
    options: StructuredPruning,
    importance_name: str,
    ignored_names: list[str],
    blocks: list[str],
) -> dict[str, Any]:
    """Prune each traceable ``nn.Sequential`` of ``model`` on its own, in place.

    For models whose whole graph torch-pruning cannot trace. Inside such a block (an MLP, a
    branch, an inverted residual) only the channels that do not leave it are pruned: its
    last Conv/Linear keeps its outputs. A block that does not still take its original input
    and give an output of the original shape is put back as it was.
    """

    names = _traceable_sequentials(model, blocks)
    inputs = _inputs_of(model, example, names)
    keep = {id(model.get_submodule(n)) for n in ignored_names}
    pruned, restored, kept, whole = [], [], [], []
    for name, x in inputs.items():
        block = model.get_submodule(name)
        order = execution_order(block, x)
        if len(order) < 2:
            continue
        before = copy.deepcopy(block)
        with torch.no_grad():  # clones: an in-place first layer must not change x
            out_before = block(x.clone())
        layers = dict(block.named_modules())
        use = importance_name
        if use == "bn_scale" and not has_batchnorm(block):
            use = "l2"
        ignored = [layers[order[-1]]] + [m for m in block.modules() if id(m) in keep]
        try:
            plan, pruner = plan_pruning(
                block,
                x.clone(),
                importance=use,
                allocation=options.allocation(),
                ignored=ignored,
            )
            apply_plan(pruner, plan)
            with torch.no_grad():
                ok = _shape(block(x.clone())) == _shape(out_before)
        except Exception:
            ok = False
        if not ok:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, before)
            restored.append(name)
        elif sum(p.numel() for p in block.parameters()) < sum(
            p.numel() for p in before.parameters()
        ):
            pruned.append(name)
            kept += [f"{name}.{n}" for n in plan.kept_at_round_to]
            whole += [f"{name}.{n}" for n in plan.left_whole]
    inside = _prune_inside_blocks(model, example, options, blocks)
    left = [b for b in blocks if b not in inside]
    return {
        "pruning": {
            "importance": importance_name,
            "ratio": options.ratio,
            "round_to": options.round_to,
            "left_whole": [*left, *restored, *ignored_names, *whole],
            "pruned_blocks": pruned,
            "pruned_inside": inside,
            "kept_at_round_to": sorted(kept),
        }
    }


def _prune_inside_blocks(
    model: nn.Module, example: torch.Tensor, options: StructuredPruning, blocks: list[str]
) -> dict[str, dict[str, int]]:
    """Let the adapters of untraceable blocks prune inside them (e.g. MaxVit's heads).

    A block whose output shape changes, or whose adapter fails, is put back as it was.
    """
    modules = dict(model.named_modules())
    names = [n for n in blocks if (a := adapter_for(modules[n])) and a.prune_inside]
    inputs = _inputs_of(model, example, names)
    done: dict[str, dict[str, int]] = {}
    for name, x in inputs.items():
        block = model.get_submodule(name)
        before = copy.deepcopy(block)
        try:
            with torch.no_grad():
                shape = _shape(block(x))
            result = adapter_for(block).prune_inside(block, options.ratio)
            with torch.no_grad():
                ok = _shape(block(x)) == shape
        except Exception:
            ok = False
        if not ok:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, before)
        elif any(result.values()):
            done[name] = result
    return done


def _size_change(
    model: nn.Module, example: torch.Tensor, params_before: int, macs_before: int
) -> dict[str, Any]:
    """The report's params/MACs before, and their ratios after pruning ``model``."""
    params_after, macs_after = count_params_macs(model, example)
    return {
        "params_before": params_before,
        "macs_before": macs_before,
        "params_ratio": round(params_after / params_before, 4) if params_before else None,
        "macs_ratio": round(macs_after / macs_before, 4) if macs_before else None,
    }


def _note_left_whole(
    model: nn.Module, details: dict[str, Any], blocks: list[str], what: str
) -> None:
    """Warn, and note in the report, which untraceable blocks pruning left whole."""
    shown = ", ".join(blocks[:3]) + (", ..." if len(blocks) > 3 else "")
    pruned = details["pruning"]["pruned_blocks"]
    inside = details["pruning"]["pruned_inside"]
    where = (
        f"pruned only inside {len(pruned)} self-contained blocks (MLPs, branches) instead"
        if pruned
        else "left the whole model unpruned"
    )
    if inside:
        heads = sum(r.get("heads_removed", 0) for r in inside.values())
        where += f", and removed {heads} whole heads inside {len(inside)} of those blocks"
    note = (
        f"torch-pruning cannot trace the {what} of "
        f"{type(model).__name__} ({shown}), so it {where}; the later stages still run"
    )
    warnings.warn(f"structured_pruning: {note}", stacklevel=3)
    details["notes"] = [note]


def _heads_summary(
    model: nn.Module, heads_before: list[int], options: StructuredPruning
) -> dict[str, Any] | None:
    """How attention was pruned: the mode, and the heads of all layers before and after."""
    if not heads_before:
        return None
    after = [info.heads for _n, _m, _a, info in attention_blocks(model)]
    return {
        "mode": options.attention_heads,
        "layers": len(heads_before),
        "heads_before": sum(heads_before),
        "heads_after": sum(after),
    }


def _shape(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_shape(o) for o in out)
    return type(out).__name__
