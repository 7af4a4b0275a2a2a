"""The pruning-ratio search under an accuracy budget, as the pipeline runs it: which stages a
candidate reruns, and what each candidate's accuracy is, before INT8 and after."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import RecipeError, UserError
from ..pruning.search import search_ratio
from ..runtime.export import export_onnx
from ..runtime.measure import (
    count_params_macs,
    onnx_predictor,
    torch_predictor,
    torch_threads,
)
from ..stage import STAGES, Quantizer, RatioPruner, RunContext, Stage, State


def search_span(stages: list[Stage], options: dict[str, Any]) -> tuple[int, int, int] | None:
    """With ``max_search_minutes``: the stages a candidate ratio runs, as (first, the
    pruning stage, end): sparsity training before the pruning, the pruning, and the torch
    stages after it. Refuses a pipeline the search cannot work on."""
    if "max_search_minutes" not in options:
        return None
    if "max_accuracy_drop" not in options:
        msg = "max_search_minutes searches under an accuracy budget: give max_accuracy_drop too"
        raise RecipeError(msg)
    pruning = [i for i, s in enumerate(stages) if isinstance(s, RatioPruner)]
    if len(pruning) != 1:
        kinds = " or ".join(sorted(s.name for s in STAGES.values() if hasattr(s, "at_ratio")))
        msg = (
            f"max_search_minutes searches the ratio of one {kinds} stage "
            f"(the pipeline has {len(pruning)})"
        )
        raise RecipeError(msg)
    at = pruning[0]
    target = stages[at].target  # type: ignore[attr-defined]
    if target is not None:
        msg = (
            f"max_search_minutes searches the pruning ratio, but {stages[at].name} has "
            f"{target[0]}: give a ratio (the search's first candidate) instead"
        )
        raise RecipeError(msg)
    first = min([i for i in range(at) if stages[i].prepares] + [at])
    end = next((i for i in range(at + 1, len(stages)) if stages[i].runtime != "torch"), None)
    return first, at, len(stages) if end is None else end


def candidate_numbers(state: State, ctx: RunContext, quantizer: Any) -> dict[str, Any]:
    """A search candidate's accuracy, size in parameters and MACs, and, when an INT8 stage
    follows, the accuracy of its INT8 file (calibrated on a sample; the nodes the accuracy
    budget reverts in FP32 as the stage would, their count as ``int8_fp32_nodes``)."""
    params, macs = count_params_macs(state.model, state.example_input)
    with torch_threads(ctx.threads):
        accuracy = float(ctx.eval_fn(torch_predictor(state.model.cpu()), ctx.eval_data))
    numbers: dict[str, Any] = {"accuracy": accuracy, "params": params, "macs": macs}
    if quantizer is not None:
        with tempfile.TemporaryDirectory(prefix="compressor-search-") as tmp:
            fp32 = Path(tmp) / "candidate.onnx"
            export_onnx(
                state.model, state.example_input, fp32, threads=ctx.threads, labels=ctx.io.labels
            )
            out = Path(tmp) / "candidate.int8.onnx"
            int8, budget = quantizer.quantize_sample(fp32, out, ctx, placement=False, budget=True)
            if budget is None:
                predict = onnx_predictor(int8, ctx.threads)
                numbers["int8_accuracy"] = float(ctx.eval_fn(predict, ctx.eval_data))
            else:  # what the INT8 stage's budget will revert, as it will
                numbers["int8_accuracy"] = budget.get("accuracy", budget["int8_accuracy"])
                numbers["int8_fp32_nodes"] = len(budget["fp32_nodes"])
    return numbers


def search_pruning_ratio(
    stages: Sequence[Stage],
    span: tuple[int, int, int],
    state: State,
    ctx: RunContext,
    apply: Callable[..., tuple[State, float]],
    max_drop: float,
    minutes: float,
) -> dict[int, tuple[State, float]]:
    """Search the pruning ratio under the budget (`compressor.pruning.search`): run the
    span's stages per candidate with ``apply(index, state, ctx, stages)``; the chosen one's
    states and seconds, by stage index."""
    first, pruning, end = span
    baseline = state.rows[0].accuracy
    if baseline is None:
        msg = "the pruning-ratio search needs the baseline's accuracy (an eval_fn result)"
        raise UserError(msg)
    quantizer = next((s for s in stages[end:] if isinstance(s, Quantizer)), None)

    def shape(ratio: float) -> Any:  # what the ratio prunes: (params, MACs) left
        options = stages[pruning].at_ratio(ratio)
        return options.pruned_size(state.model, state.example_input, ctx.threads)

    def run(ratio: float) -> tuple[float | None, dict[str, Any], Any]:
        chosen = list(stages)
        chosen[pruning] = stages[pruning].at_ratio(ratio)
        current = state.replace(model=copy.deepcopy(state.model))
        done: dict[int, tuple[State, float]] = {}
        for index in range(first, end):
            current, seconds = apply(index, current, ctx, chosen)
            done[index] = (current, seconds)
        numbers = candidate_numbers(current, ctx, quantizer)
        # within the budget before INT8 and after: the INT8 stage cannot win back what
        # the stages before it lost
        accuracy = min(numbers["accuracy"], numbers.get("int8_accuracy", 1.0))
        return baseline - accuracy, numbers, done

    ctx.log(
        f"searching the pruning ratio under the accuracy budget "
        f"({max_drop * 100:.2f} points, at most {minutes:g} min)"
    )
    outcome = search_ratio(
        run,
        first=stages[pruning].ratio,  # type: ignore[attr-defined]
        max_drop=max_drop,
        minutes=minutes,
        log=ctx.log,
        shape=shape,
    )
    ctx.log(
        f"search: chose ratio {outcome.chosen.ratio:.3f} "
        f"({'within' if outcome.chosen.met else 'NOT within'} the budget)"
    )
    found: dict[int, tuple[State, float]] = outcome.chosen.result
    pruned = found[pruning][0]
    pruned.details.setdefault("pruning", {})["search"] = outcome.record
    return found
