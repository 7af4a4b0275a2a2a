"""The pruning plan as a value a training script holds: `plan_pruning` makes it (the channels
the `StructuredPruning` stage would remove, and what the model keeps), `prune` carries it out
on a copy. `SparsityRegularizer` drives the same channels to zero in between."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import as_data_spec
from ..errors import ModelError, UserError
from ..inputs import call
from ..models.adapters import restructure, untraceable_blocks
from ..models.layers import call_naming_layer, has_batchnorm, unwrap_parallel
from ..runtime.measure import count_params_macs
from ..training.loop import recalibrate_batchnorm
from .engine import make_plan
from .engine import prune as prune_in_place
from .structured import StructuredPruning

MEASURED = ("target_size_mb", "target_latency_ms")


@dataclass
class PruningPlan:
    """Which channels pruning removes from a model, and what the model keeps.

    Made by `plan_pruning`; read by `SparsityRegularizer` (the channels it drives to zero)
    and `prune` (which removes them). The numbers are those of the model pruned at the
    plan (``macs_after`` is what `prune` gives a model that still has the plan's weights).

    Attributes:
        options: the `StructuredPruning` options the plan was made with, at the ``ratio``
            that meets the target when one was given, with the importance it chose.
        target: the target given (``("target_macs", 4e6)``), or None for a ratio.
        example_input: the input the model was traced with (a batch of one).
        params_before, macs_before, params_after, macs_after: the model's parameters and
            multiply-accumulates before and after pruning at the plan.
        removed_channels, prunable_channels: channels the plan removes, of those it may.
        restructured: blocks replaced (in the given model) so torch-pruning sees their
            channels, as the pipeline does (name -> adapter).
        traceable: torch-pruning traces the model whole (else the regularizer falls back
            to the L1 penalty: ``why_not_scheduled``).
        search: with a target, the ratio search (every candidate tried).
    """

    options: StructuredPruning
    target: tuple[str, float] | None
    example_input: Any
    params_before: int
    macs_before: int
    params_after: int
    macs_after: int
    removed_channels: int
    prunable_channels: int
    structure: dict[str, tuple[int, ...]] = field(repr=False)
    restructured: dict[str, str] = field(default_factory=dict)
    traceable: bool = True
    why_not_scheduled: str = ""
    search: dict[str, Any] | None = field(default=None, repr=False)
    importance_choice: dict[str, Any] | None = field(default=None, repr=False)
    groups: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ratio(self) -> float:
        """Share of the prunable channels removed."""
        assert self.options.ratio is not None
        return self.options.ratio

    @property
    def importance(self) -> str:
        """How channels are ranked (``bn_scale``, ``l2``, ``lamp``, ...)."""
        return self.groups.get("importance", self.options.importance)

    @property
    def macs_ratio(self) -> float:
        """``macs_before / macs_after``: how many times fewer MACs the pruned model runs."""
        return self.macs_before / max(1, self.macs_after)

    def __repr__(self) -> str:
        aim = f", {self.target[0]}={self.target[1]:g}" if self.target else ""
        return (
            f"PruningPlan(ratio={self.ratio:.4g}{aim}, importance={self.importance!r}, "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.2f}x fewer), "
            f"params {self.params_before:,} -> {self.params_after:,}, "
            f"channels removed {self.removed_channels} of {self.prunable_channels})"
        )

    def check_model(self, model: nn.Module) -> None:
        """Raise `ModelError` unless ``model`` has the structure the plan was made for."""
        found = structure_of(unwrap_parallel(model))
        if found == self.structure:
            return
        missing = [n for n in self.structure if n not in found]
        extra = [n for n in found if n not in self.structure]
        shapes = [n for n in self.structure if n in found and found[n] != self.structure[n]]
        if missing or extra:
            what = (
                f"it lacks {missing[0]!r}"
                if missing
                else f"it has {extra[0]!r}, the plan's does not"
            )
        else:
            name = shapes[0]
            what = (
                f"{name!r} has shape {list(found[name])}, the plan's {list(self.structure[name])}"
            )
        msg = (
            f"this pruning plan was made for another model ({what}): make the plan for this "
            "model with cz.plan_pruning(model, example_input, ...)"
        )
        raise ModelError(msg)

    def target_record(self) -> dict[str, Any]:
        """The plan as a sparsity report shows it (``details.sparsity.target``): the ratio
        and importance the pruning stage tries first."""
        return {
            "ratio": self.ratio,
            "importance": self.importance,
            **(
                {"pruning_target": {"option": self.target[0], "value": self.target[1]}}
                if self.target
                else {}
            ),
            **({"importance_choice": self.importance_choice} if self.importance_choice else {}),
            **{k: v for k, v in self.groups.items() if k != "importance"},
        }

    def summary(self) -> dict[str, Any]:
        """Plain numbers: ratio, importance, MACs and params before and after, channels."""
        return {
            "ratio": round(self.ratio, 4),
            "importance": self.importance,
            **({"target": {self.target[0]: self.target[1]}} if self.target else {}),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "removed_channels": self.removed_channels,
            "prunable_channels": self.prunable_channels,
        }


def plan_pruning(
    model: nn.Module,
    example_input: Any,
    *,
    ratio: float | None = None,
    target_macs: float | str | None = None,
    target_params: float | str | None = None,
    importance: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> PruningPlan:
    """The pruning plan the `StructuredPruning` stage would make for ``model``.

    Give ``ratio`` (share of the prunable channels removed; 0.5 when nothing is given) or
    one target (``target_macs``, ``target_params``, as numbers or text like ``"150M"``): the
    ratio is then searched on pruned copies. ``options`` are any other `StructuredPruning`
    options (``round_to``, ``global_pruning``, ``ignored_layers``, ``max_layer_ratio``,
    ``attention_heads``, ``latency_aware``, ...), with their meaning there. ``model`` is
    not trained or pruned; blocks whose adapters restructure them (attention layers that
    torch-pruning cannot split into heads) are replaced in it by modules that compute the
    same, as the pipeline does, so build the optimizer after this call.

    Example:
        >>> plan = cz.plan_pruning(model, torch.randn(1, 3, 32, 32), ratio=0.5)  # doctest: +SKIP
        >>> plan.macs_before / plan.macs_after                                  # doctest: +SKIP

    Raises:
        RecipeError: a bad option (named, with what is allowed), or a measured target
            (size, latency: those need the pipeline's run).
        ModelError: torch-pruning cannot trace the model, or it fails on ``example_input``.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module (got: {type(model).__name__})")
    for option in MEASURED:
        if option in options:
            msg = (
                f"plan_pruning: {option} is measured on the quantized artifact; use it in a "
                "cz.Pipeline (allowed here: ratio, target_macs, target_params)"
            )
            raise UserError(msg)
    stage = StructuredPruning.from_dict(
        {
            "ratio": ratio,
            "target_macs": target_macs,
            "target_params": target_params,
            "importance": importance,
            **options,
        }
    )
    _check_runs(model, example_input)
    with evaluating(model):
        restructured = restructure(model, example_input)
        resolved, search = stage.resolve(model, example_input, None)
    return plan_for(
        model,
        example_input,
        resolved,
        target=stage.target,
        search=search.to_dict() if search else None,
        restructured=restructured,
        threads=threads,
    )


def plan_for(
    model: nn.Module,
    example_input: Any,
    options: StructuredPruning,
    *,
    target: tuple[str, float] | None = None,
    search: dict[str, Any] | None = None,
    importance_choice: dict[str, Any] | None = None,
    restructured: dict[str, str] | None = None,
    threads: int | None = None,
) -> PruningPlan:
    """The plan of ``options`` (a ratio, no target) for ``model`` as it is; the sizes from
    a pruned copy. `plan_pruning` and `SparsityTraining` make their plans here."""
    with evaluating(model):  # tracing must not move BatchNorm statistics
        params_before, macs_before = count_params_macs(model, example_input)
        why = untraceable_reason(model)
        groups: dict[str, Any] = {}
        removed = prunable = 0
        if not why:
            found, _pruner, _ = make_plan(model, example_input, options, threads)
            groups = {"importance": found.importance, **found.summary()}
            removed, prunable = found.removed_channels, found.prunable_channels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real `prune` warns the user of any shortfall
            params_after, macs_after = options.pruned_size(model, example_input, threads)
        assert isinstance(options, StructuredPruning)
        return PruningPlan(
            options=options,
            target=target,
            example_input=example_input,
            params_before=params_before,
            macs_before=macs_before,
            params_after=params_after,
            macs_after=macs_after,
            removed_channels=removed,
            prunable_channels=prunable,
            structure=structure_of(model),
            restructured=dict(restructured or {}),
            traceable=not why,
            why_not_scheduled=why,
            search=search,
            importance_choice=importance_choice,
            groups=groups,
        )


def prune(
    model: nn.Module,
    example_input: Any,
    plan: PruningPlan,
    *,
    recalibration_data: Any = None,
    recalibration_batches: int = 32,
    threads: int | None = None,
) -> nn.Module:
    """A copy of ``model`` with the plan's channels removed, checked as the pruning stage
    checks it (the pruned model runs, gives outputs of the same shape, and every group
    whose removal would change what the kept channels compute is left whole, with a
    warning). ``model`` is not changed.

    The plan is made again on ``model`` with the plan's options (channels already exactly
    zero, as `SparsityRegularizer` leaves them, go first), and with a target the ratio is
    searched again starting from the plan's. With ``recalibration_data`` (batches of
    ``(inputs, targets)``, a DataLoader, or a `DataSpec`), BatchNorm statistics are re-estimated on
    ``recalibration_batches`` of them.

    Raises:
        ModelError: the plan was made for a model of another structure, or pruning fails.
    """
    if not isinstance(plan, PruningPlan):
        msg = f"plan must be a cz.PruningPlan from cz.plan_pruning (got: {type(plan).__name__})"
        raise UserError(msg)
    base = unwrap_parallel(model)
    plan.check_model(base)
    work = copy.deepcopy(base).cpu().eval()
    options = plan.options
    if plan.target is not None:
        targeted = dataclasses.replace(options, ratio=None, **{plan.target[0]: plan.target[1]})
        options, _ = targeted.resolve(work, example_input, None, first=plan.ratio)
    pruned, details = prune_in_place(work, example_input, options, threads=threads)
    if recalibration_data is not None and has_batchnorm(pruned):
        data = as_data_spec(recalibration_data, "recalibration_data")
        recalibrate_batchnorm(pruned, data, recalibration_batches)
    del details  # its notes were warned by the engine
    return pruned.eval()


def untraceable_reason(model: nn.Module) -> str:
    """Why torch-pruning cannot trace ``model`` whole (its blocks adapters mark), or ''."""
    blocks = untraceable_blocks(model)
    if not blocks:
        return ""
    what = " and ".join(sorted(set(blocks.values())))
    return f"torch-pruning cannot trace the {what} of {type(model).__name__} whole"


def module_for_plan(root: nn.Module, plan: PruningPlan) -> nn.Module:
    """The module of ``root`` (itself or a submodule) the plan was made for, by structure
    (a LightningModule or a wrapper holding the planned network).

    Raises:
        ModelError: no module of ``root`` has the plan's structure.
    """
    for module in (root, *root.modules()):
        if structure_of(module) == plan.structure:
            return module
    plan.check_model(root)  # raises, naming the difference from the root
    return root


def structure_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's name and shape: what a plan must match."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_runs(model: nn.Module, example_input: Any) -> None:
    """The model runs on ``example_input`` (else a `ModelError` naming the failing layer)."""
    with evaluating(model), torch.no_grad():
        try:
            call_naming_layer(model, lambda: call(model, example_input), "a forward pass")
        except ModelError:
            raise
        except Exception as exc:
            msg = f"the model cannot run on example_input: {exc}"
            raise ModelError(msg) from exc


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (tracing must not move BatchNorm statistics), then as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
