"""The pruning-ratio search under an accuracy budget (``Pipeline(max_search_minutes=...)``).

The pipeline runs the stages that depend on the pruning ratio (sparsity training before the
pruning, the pruning, distillation and fine-tuning after it) once per candidate ratio and
gives `search_ratio` the candidate's accuracy drop against the baseline. The search starts at
the pruning stage's own ratio, then bisects: more pruning while a candidate is within the
budget, less while it is not, until the bracket is narrower than `RESOLUTION`, the time box
would be passed by one more candidate, or `MAX_CANDIDATES` ran. It keeps the most pruned
candidate within the budget, or, when none is, the one that lost least. Every candidate's
numbers are the search trace in the report (``budget.search``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .target import MAX_RATIO

RESOLUTION = 0.05
"""The search stops once the ratios within and over the budget are this close."""
MAX_CANDIDATES = 8
"""At most this many candidate ratios are run, whatever the time box."""


@dataclass
class Candidate:
    """One candidate ratio's outcome: ``numbers`` go into the trace, ``result`` is the
    caller's (the trained states), kept for the chosen candidate only."""

    ratio: float
    drop: float | None
    met: bool
    seconds: float
    numbers: dict[str, Any] = field(default_factory=dict)
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The trace entry."""
        drop = None if self.drop is None else round(self.drop, 6)
        return {
            "ratio": self.ratio,
            "accuracy_drop": drop,
            "met": self.met,
            "seconds": round(self.seconds, 2),
            **self.numbers,
        }


@dataclass
class SearchOutcome:
    """The chosen candidate and the search's record for the report."""

    chosen: Candidate
    record: dict[str, Any]


Run = Callable[[float], tuple[float | None, dict[str, Any], Any]]
"""``run(ratio) -> (accuracy drop or None, numbers for the trace, result)``."""


def search_ratio(
    run: Run,
    *,
    first: float,
    max_drop: float,
    minutes: float,
    log: Callable[[str], None] = lambda _: None,
    clock: Callable[[], float] = time.perf_counter,
    shape: Callable[[float], Any] | None = None,
) -> SearchOutcome:
    """The most pruned ratio whose candidate loses at most ``max_drop``, searched from
    ``first`` within ``minutes``; always at least one candidate (``first``) runs.

    ``shape(ratio)``, when given, is what a ratio prunes (cheap to find, e.g. the sizes left):
    a ratio with the shape of one already run is not run again (``same_as`` in its entry)."""
    start = clock()
    deadline = start + minutes * 60
    tried: list[Candidate] = []
    within, over = 0.0, None  # ratios known within / over the budget (0: nothing pruned)
    ratio: float | None = round(first, 3)
    stopped = "converged"
    shapes: dict[Any, Candidate] = {}
    while ratio is not None:
        began = clock()
        key = shape(ratio) if shape else None
        same = shapes.get(key) if key is not None else None
        if same is not None:  # ratios a round_to step apart prune the same channels
            drop, result = same.drop, same.result
            numbers = {**same.numbers, "same_as": same.ratio}
        else:
            drop, numbers, result = run(ratio)
        met = drop is not None and drop <= max_drop + 1e-9
        candidate = Candidate(ratio, drop, met, clock() - began, numbers, result)
        if key is not None and same is None:
            shapes[key] = candidate
        tried.append(candidate)
        shown = "n/a" if drop is None else f"{drop * 100:.2f} points"
        again = f", the channels {same.ratio:.3f} pruned" if same is not None else ""
        log(
            f"search: ratio {ratio:.3f} lost {shown} "
            f"({'within' if met else 'over'} the budget{again}), {candidate.seconds:.0f} s"
        )
        _keep_results(tried)
        if met:
            within = max(within, ratio)
        else:
            over = ratio if over is None else min(over, ratio)
        ratio = _next_ratio(within, over)
        per_candidate = (clock() - start) / len(tried)
        if ratio is None:
            break
        if len(tried) >= MAX_CANDIDATES:
            stopped = "max candidates"
            break
        if clock() + per_candidate > deadline:
            stopped = "time box"
            break
    chosen = _best(tried)
    record = {
        "max_search_minutes": minutes,
        "max_accuracy_drop": max_drop,
        "ratio": chosen.ratio,
        "met": chosen.met,
        "stopped": stopped,
        "seconds": round(clock() - start, 1),
        "trace": [c.to_dict() for c in tried],
    }
    return SearchOutcome(chosen=chosen, record=record)


def _next_ratio(within: float, over: float | None) -> float | None:
    """The middle of the bracket, or None once it is narrower than `RESOLUTION`."""
    high = MAX_RATIO if over is None else over
    if high - within < RESOLUTION or (over is None and within >= MAX_RATIO):
        return None
    if over is None and MAX_RATIO - within < 2 * RESOLUTION:
        return MAX_RATIO  # the last step up: the most pruning there is
    middle = round((within + high) / 2, 3)
    return None if middle < RESOLUTION else middle  # below it, hardly anything is pruned


def _best(tried: list[Candidate]) -> Candidate:
    """The most pruned candidate within the budget, else the one that lost least; of two
    that pruned the same channels (``numbers["same_as"]``), the one that ran first."""
    tried = [c for c in tried if "same_as" not in c.numbers] or tried
    within = [c for c in tried if c.met]
    if within:
        return max(within, key=lambda c: c.ratio)
    known = [c for c in tried if c.drop is not None]
    return min(known, key=lambda c: c.drop) if known else tried[0]


def _keep_results(tried: list[Candidate]) -> None:
    """Drop every candidate's result but the current best's (trained models are large)."""
    best = _best(tried)
    for c in tried:
        if c is not best:
            c.result = None
