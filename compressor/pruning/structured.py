"""StructuredPruning: remove whole channels through torch-pruning's dependency graph."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import data_subset
from ..errors import ModelError, RecipeError
from ..inputs import rows
from ..models.layers import has_batchnorm
from ..runtime.measure import EvalFn, count_params_macs, torch_predictor
from ..runtime.runtimes import ONNX_RUNTIMES
from ..stage import Stage, check_bool, check_choice, check_float, check_int, register_stage
from ..training.loop import recalibrate_batchnorm
from .engine import ignored_modules, make_plan, prune
from .plan import (
    IMPORTANCES,
    Allocation,
    GroupPlan,
    auto_importances,
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
            `SparsityTraining` drives toward zero; with a target, ``lamp`` instead when it is
            clearly more accurate at the target (`_choose_importance`); also ``l1``, ``lamp``,
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
    phase = "pruning"
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
        target, its BatchNorms re-estimated, scored on `AUTO_SAMPLES` eval inputs; a later
        one replaces the one kept only when it scores clearly higher (`clearly_better`).
        At one target the candidates cost the same, so the more accurate ranking is the
        better one; a model trained from scratch has BatchNorm scales that say little, and
        ranking by them can cost most of its accuracy where LAMP's per-layer normalised
        weights cost a little. Scores within sampling noise of each other (near chance,
        after a cut that training must repair) say nothing about which ranking recovers
        better: then the first, the quantity `SparsityTraining` drives to zero, is kept."""
        subset = data_subset(ctx.eval_data, AUTO_SAMPLES)
        samples = sum(rows(subset.input_fn(batch)) for batch in subset)
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
            if best is None or clearly_better(score, best[0], samples):
                best = (score, options, search)
        assert best is not None
        _, options, search = best
        search.importance = {
            "chosen": options.importance,
            "trials": [{**t, "score": round(t["score"], 6)} for t in trials],
            "samples": samples,
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

    def plan_at(work: nn.Module, ratio: float) -> tuple[GroupPlan, Any]:
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


def clearly_better(score: float, kept: float, samples: int) -> bool:
    """Whether ``score`` beats ``kept`` by more than two standard errors of the difference
    of two accuracies (proportions in [0, 1]) measured on ``samples`` inputs each; a
    metric outside [0, 1] counts any gain."""

    def variance(p: float) -> float:
        return p * (1 - p) if 0 <= p <= 1 else 0.0

    margin = 2 * math.sqrt((variance(score) + variance(kept)) / max(samples, 1))
    return score - kept > margin


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
