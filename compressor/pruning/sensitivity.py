"""Pruning sensitivity: how much accuracy each coupled channel group loses, pruned alone.

For each ratio, every prunable group (the channels torch-pruning removes together, named by
its root layer) loses that share of its lowest-ranked channels, alone, and the model is
evaluated on a subset of the eval data; then it is put back. No BatchNorm recalibration and
no training follow, so the drops rank the groups (which ones a pruning plan should spare)
rather than forecast the accuracy after distillation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data import data_subset
from ..errors import ModelError, RecipeError
from ..models.adapters import restructure, untraceable_blocks
from ..models.model_io import top1
from ..runtime.measure import EvalFn, count_params_macs, torch_predictor
from .check import pruned_alone
from .plan import GroupPlan

PlanAt = Callable[[nn.Module, float], tuple[GroupPlan, Any]]
"""``plan_at(model, ratio)``: the uniform plan at ``ratio`` for ``model``, and its pruner."""


def measure_sensitivity(
    model: nn.Module,
    example: torch.Tensor,
    data: Any,
    plan_at: PlanAt,
    *,
    ratios: Sequence[float],
    samples: int,
    eval_fn: EvalFn | None = None,
) -> dict[str, Any]:
    """Each group's accuracy with ``ratios`` of its channels removed alone (see module doc).

    ``model`` is not changed. Returns ``accuracy`` (the unpruned model's on the subset),
    ``macs``, ``ratios``, ``samples``, ``groups`` (per group: ``group`` (its root layer),
    ``members``, ``width``, ``mean_drop`` and per ratio ``ratio``, ``removed`` channels,
    ``accuracy``, ``drop``, ``macs_saved`` (share of the model's MACs); the largest mean drop
    first), ``failed`` (groups that could not be pruned alone) and ``seconds``.

    Raises:
        RecipeError: a ratio outside (0, 1) or fewer than one sample.
        ModelError: a model torch-pruning cannot trace whole (pruned block by block).
    """
    start = time.perf_counter()
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise RecipeError(f"pruning sensitivity ratios must lie in (0, 1) (got: {list(ratios)})")
    if samples < 1:
        raise RecipeError(f"pruning sensitivity samples must be at least 1 (got: {samples})")
    subset = data_subset(data, samples)
    evaluate = eval_fn or top1
    work = copy.deepcopy(model).cpu().eval()
    restructure(work, example)
    blocks = untraceable_blocks(work)
    if blocks:
        what = " and ".join(sorted(set(blocks.values())))
        msg = (
            f"pruning sensitivity needs a model torch-pruning traces whole; {type(model).__name__} "
            f"has {what} blocks, pruned block by block"
        )
        raise ModelError(msg)
    with torch.no_grad():
        accuracy = float(evaluate(torch_predictor(work), subset))
    macs = count_params_macs(work, example)[1]
    groups: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for ratio in ratios:
        plan, pruner = plan_at(work, ratio)
        for planned in plan.groups:
            with pruned_alone(work, example, pruner, planned) as ok:
                if not ok:
                    failed.append(planned.root)
                    continue
                with torch.no_grad():
                    pruned_accuracy = float(evaluate(torch_predictor(work), subset))
                pruned_macs = count_params_macs(work, example)[1]
            entry = groups.setdefault(
                planned.root,
                {
                    "group": planned.root,
                    "members": planned.members,
                    "width": planned.width,
                    "ratios": [],
                },
            )
            entry["ratios"].append(
                {
                    "ratio": ratio,
                    "removed": len(planned.remove),
                    "accuracy": round(pruned_accuracy, 6),
                    "drop": round(accuracy - pruned_accuracy, 6),
                    "macs_saved": round(1 - pruned_macs / macs, 6) if macs else 0.0,
                }
            )
    for entry in groups.values():
        drops = [r["drop"] for r in entry["ratios"]]
        entry["mean_drop"] = round(sum(drops) / len(drops), 6)
    ranked = sorted(groups.values(), key=lambda g: -g["mean_drop"])
    return {
        "accuracy": round(accuracy, 6),
        "macs": macs,
        "ratios": list(ratios),
        "samples": sum(int(subset.input_fn(b).shape[0]) for b in subset),
        "groups": ranked,
        "failed": sorted(set(failed)),
        "seconds": round(time.perf_counter() - start, 2),
    }
