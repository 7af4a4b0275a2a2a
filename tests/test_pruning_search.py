"""The pruning-ratio search under an accuracy budget (``max_search_minutes``)."""

import json

import pytest
import torch
from conftest import TinyResNet, fit

import compressor as cz
from compressor.pruning.search import MAX_CANDIDATES, RESOLUTION, search_ratio


def _run_with(drop_at):
    """``run`` for `search_ratio` whose candidate at ``r`` loses ``drop_at(r)``."""
    ran = []

    def run(ratio):
        ran.append(ratio)
        return drop_at(ratio), {"macs": round(1000 * (1 - ratio) ** 2)}, f"model at {ratio}"

    return run, ran


def test_search_finds_the_edge_of_the_budget_from_below():
    run, ran = _run_with(lambda r: max(0.0, r - 0.6))  # within up to 0.6 + budget
    outcome = search_ratio(run, first=0.3, max_drop=0.01, minutes=10)
    assert ran[0] == 0.3 and ran[1] > 0.3  # within: more pruning next
    assert outcome.chosen.met and outcome.record["met"]
    assert 0.61 - RESOLUTION <= outcome.chosen.ratio <= 0.61
    assert outcome.chosen.result == f"model at {outcome.chosen.ratio}"
    assert [c["ratio"] for c in outcome.record["trace"]] == ran
    assert outcome.record["stopped"] == "converged"
    kept = [c for c in outcome.record["trace"] if c["met"]]
    assert outcome.record["ratio"] == max(c["ratio"] for c in kept)


def test_search_goes_down_when_the_first_ratio_is_over_and_keeps_only_the_best_model():
    run, ran = _run_with(lambda r: 0.2 * r)
    outcome = search_ratio(run, first=0.5, max_drop=0.05, minutes=10)
    assert ran[0] == 0.5 and ran[1] < 0.5
    assert outcome.chosen.met and outcome.chosen.ratio <= 0.25
    # the trained states of every other candidate were let go
    assert outcome.chosen.result is not None


def test_search_with_nothing_within_the_budget_keeps_the_one_that_lost_least():
    run, ran = _run_with(lambda r: 0.1 + r)
    outcome = search_ratio(run, first=0.5, max_drop=0.01, minutes=10)
    assert not outcome.chosen.met and not outcome.record["met"]
    assert outcome.chosen.ratio == min(ran) < RESOLUTION * 2
    assert outcome.chosen.result == f"model at {min(ran)}"


def test_a_ratio_that_prunes_what_another_did_is_not_run_again():
    run, ran = _run_with(lambda r: max(0.0, r - 0.6))
    # every ratio prunes a multiple of 0.2 (as round_to makes widths jump)
    outcome = search_ratio(run, first=0.5, max_drop=0.01, minutes=10, shape=lambda r: int(r / 0.2))
    trace = outcome.record["trace"]
    assert len(ran) < len(trace)  # some candidates were answered from an earlier one
    again = [c for c in trace if "same_as" in c]
    assert again and all(int(c["ratio"] / 0.2) == int(c["same_as"] / 0.2) for c in again)
    assert "same_as" not in next(c for c in trace if c["ratio"] == outcome.chosen.ratio)
    assert outcome.chosen.result == f"model at {outcome.chosen.ratio}"


def test_search_stops_at_the_time_box_and_at_max_candidates(monkeypatch):
    now = [0.0]

    def clock():
        return now[0]

    def run(ratio):
        now[0] += 40.0  # each candidate takes 40 s
        return 0.0, {}, None

    outcome = search_ratio(run, first=0.2, max_drop=0.01, minutes=1.5, clock=clock)
    assert len(outcome.record["trace"]) == 2  # a third would end past 90 s
    assert outcome.record["stopped"] == "time box"
    run2, ran = _run_with(lambda r: 0.0 if r < 0.9 else 1.0)
    outcome = search_ratio(run2, first=0.05, max_drop=0.01, minutes=60)
    assert outcome.record["stopped"] == "converged" and len(ran) <= MAX_CANDIDATES
    monkeypatch.setattr("compressor.pruning.search.MAX_CANDIDATES", 3)
    run3, ran = _run_with(lambda r: 0.0 if r < 0.9 else 1.0)
    outcome = search_ratio(run3, first=0.05, max_drop=0.01, minutes=60)
    assert outcome.record["stopped"] == "max candidates" and len(ran) == 3
    assert outcome.chosen.ratio == max(ran)  # all within: the most pruned


def test_pipeline_search_runs_the_span_per_candidate_and_keeps_the_chosen_one(data, tmp_path):
    torch.manual_seed(0)
    model = fit(TinyResNet(), data[0])
    stages = [
        cz.StructuredPruning(ratio=0.5, round_to=1),
        cz.Distillation(epochs=1),
        cz.Int8Quantization(calibration_samples=32, fp32_placement=False),
    ]
    pipeline = cz.Pipeline(stages, max_accuracy_drop=0.03, max_search_minutes=5)
    result = pipeline.run(
        model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    document = json.loads((tmp_path / "report.json").read_text())
    pruning = next(r for r in document["rows"] if r["name"] == "structured_pruning")
    search = pruning["details"]["pruning"]["search"]
    trace = search["trace"]
    assert len(trace) >= 2 and trace[0]["ratio"] == 0.5
    assert {"ratio", "accuracy_drop", "met", "seconds", "accuracy", "int8_accuracy", "macs"} <= set(
        trace[0]
    )
    base = document["rows"][0]["accuracy"]
    for c in trace:  # lost before INT8 or after, whichever is more
        worst = min(c["accuracy"], c["int8_accuracy"])
        assert c["accuracy_drop"] == pytest.approx(base - worst, abs=1e-6)
    within = [c for c in trace if c["met"]]
    assert within and search["met"] and search["ratio"] == max(c["ratio"] for c in within)
    chosen = next(c for c in trace if c["ratio"] == search["ratio"])
    # the rows are the chosen candidate's: its MACs, and its accuracy after distillation
    assert pruning["macs"] == chosen["macs"]
    distilled = next(r for r in document["rows"] if r["name"] == "distillation")
    assert distilled["accuracy"] == pytest.approx(chosen["accuracy"], abs=1e-9)
    assert document["budget"]["max_accuracy_drop"] == 0.03
    assert result.budget_met == document["budget"]["met"]
    line = result.report.search_line()
    assert f"chose ratio {search['ratio']:.3f}" in line
    assert line in (tmp_path / "report.md").read_text()
    assert "Pruning-ratio search" in (tmp_path / "report.html").read_text()
    assert pipeline.to_recipe()["max_search_minutes"] == 5


@pytest.mark.parametrize(
    ("stages", "options", "match"),
    [
        ([cz.StructuredPruning()], {"max_search_minutes": 5}, "give max_accuracy_drop too"),
        (
            [cz.StructuredPruning(target_macs=1e6)],
            {"max_accuracy_drop": 0.01, "max_search_minutes": 5},
            "has target_macs: give a ratio",
        ),
        (
            [cz.StructuredPruning(), cz.StructuredPruning()],
            {"max_accuracy_drop": 0.01, "max_search_minutes": 5},
            r"one structured_pruning stage \(the pipeline has 2\)",
        ),
        ([cz.Int8Quantization()], {"max_accuracy_drop": 0.01, "max_search_minutes": 5}, "has 0"),
        (
            [cz.StructuredPruning()],
            {"max_accuracy_drop": 0.01, "max_search_minutes": 0},
            "max_search_minutes must be a number of minutes > 0",
        ),
    ],
)
def test_a_search_it_cannot_do_is_refused_in_one_line(stages, options, match):
    with pytest.raises(cz.RecipeError, match=match):
        cz.Pipeline(stages, **options)


def test_search_in_recipes_and_the_cli_flag(tmp_path, capsys):
    from compressor.cli import main

    recipe = {"max_accuracy_drop": 0.01, "max_search_minutes": 20, "stages": ["structured_pruning"]}
    pipeline = cz.Pipeline.from_recipe(recipe)
    assert pipeline.max_search_minutes == 20.0
    assert cz.Pipeline.from_recipe(pipeline.to_recipe()).max_search_minutes == 20.0
    with pytest.raises(cz.RecipeError, match="max_search_minutes must be"):
        cz.Pipeline.from_recipe({**recipe, "max_search_minutes": "soon"})
    argv = ["compress", "--model", "resnet18", "--data", "demo", "--recipe", "balanced",
            "--max-accuracy-drop", "0.005", "--max-search-minutes", "15", "--print-recipe"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "max_accuracy_drop: 0.005" in printed and "max_search_minutes: 15.0" in printed
