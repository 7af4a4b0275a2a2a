"""The prune engine: the plan made for a model, and channels removed for real through
torch-pruning's dependency graph, around and inside the blocks adapters mark."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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
from ..runtime.measure import count_params_macs, default_threads
from .check import apply_checked
from .latency_table import latency_costs
from .plan import (
    GroupPlan,
    PlannedGroup,
    apply_plan,
    plan_groups,
    resolve_importance,
)

PruneOptions = Any
"""The `StructuredPruning` stage whose options the engine reads (ratio, importance,
round_to, ...); named loosely because `structured` imports this module."""


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
    options: PruneOptions,
    threads: int | None = None,
) -> tuple[GroupPlan, Any, list[str]]:
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

    def build() -> tuple[GroupPlan, Any]:
        return plan_groups(
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
    options: PruneOptions,
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
    options: PruneOptions,
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


def _nothing_removed(plan: GroupPlan, options: PruneOptions) -> str:
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


def _shortfall(plan: GroupPlan, options: PruneOptions, failed: list[PlannedGroup]) -> str:
    """A sentence when pruning removed clearly less than ``ratio`` asked (and why), or ''."""
    if not plan.prunable_channels:
        return ""
    left = {g.root for g in failed}  # a failed group removes none of its planned channels
    removed = sum(len(g.remove) for g in plan.groups if g.root not in left)
    removed /= plan.prunable_channels
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
    options: PruneOptions,
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
            plan, pruner = plan_groups(
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
    model: nn.Module, example: torch.Tensor, options: PruneOptions, blocks: list[str]
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
    model: nn.Module, heads_before: list[int], options: PruneOptions
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
