"""Pruning to a target (MACs, parameters, file size, latency) instead of a ratio."""

import copy
import json
import warnings

import pytest
import torch
from conftest import TinyResNet, fit, synthetic_classification, write_image_folder
from torch.utils.data import DataLoader

import compressor as cz
from compressor.cli import main
from compressor.pipeline.recipe import override_recipe, read_recipe, stages_from_recipe
from compressor.pruning.engine import prune
from compressor.pruning.structured import clearly_better
from compressor.pruning.target import MAX_RATIO, parse_amount
from compressor.runtime.measure import count_params_macs


def test_macs_target_is_met_with_the_least_pruning(trained_resnet, example):
    params, macs = count_params_macs(trained_resnet, example)
    stage = cz.StructuredPruning(target_macs=macs * 0.4, round_to=None)
    options, search = stage.resolve(trained_resnet, example)
    assert count_params_macs(trained_resnet, example) == (params, macs)  # the model is kept
    assert search.met and search.reached <= macs * 0.4 and search.model_value == macs
    assert search.reached >= macs * 0.4 * 0.97  # close under the target, not far below it
    assert options.target is None and options.ratio == pytest.approx(search.ratio)
    tried = search.trace
    assert tried[0]["ratio"] == MAX_RATIO
    # every ratio tried below the chosen one missed the target: it is the least pruning
    assert all(t["value"] > macs * 0.4 for t in tried if t["ratio"] < options.ratio - 1e-4)
    pruned, _ = prune(copy.deepcopy(trained_resnet), example, options)
    assert count_params_macs(pruned, example)[1] == search.reached


def test_params_target_in_a_pipeline_with_sparsity_training(trained_resnet, data, tmp_path):
    params, _ = count_params_macs(trained_resnet, torch.randn(1, 3, 16, 16))
    stages = [
        cz.SparsityTraining(epochs=1),
        cz.StructuredPruning(target_params=params // 3, round_to=4),
    ]
    result = cz.Pipeline(stages).run(
        trained_resnet, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    row = result.report.row("structured_pruning")
    target = row.details["pruning"]["target"]
    assert target["met"] and target["option"] == "target_params" and target["unit"] == "parameters"
    assert row.params == target["reached"] <= params // 3
    sparsity = result.report.row("sparsity_training").details["sparsity"]
    assert sparsity["method"] == "growing"  # aimed at the ratio the target resolves to
    aimed = sparsity["target"]
    assert aimed["pruning_target"] == {"option": "target_params", "value": params // 3}
    # pruning tries the ratio whose channels sparsity zeroed first, and keeps it
    assert [c["ratio"] for c in target["trace"]] == [round(aimed["ratio"], 4)]
    assert target["ratio"] == round(aimed["ratio"], 4)
    assert row.details["pruning"]["removed_at_zero_fraction"] == 1.0
    # importance auto: sparsity chose it at the target, pruning ranks the same way
    choice = aimed["importance_choice"]
    assert aimed["importance"] == choice["chosen"] == row.details["pruning"]["importance"]
    assert "importance" not in target  # nothing tried again
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert next(r for r in rows if r["name"] == "structured_pruning")["details"]["pruning"][
        "target"
    ]
    line = result.report.target_line()
    assert line.startswith("Pruning target target_params") and "met at ratio" in line
    assert line in (tmp_path / "report.md").read_text()


def _auto_choice(model, data, example, tmp_path, **options):
    macs = count_params_macs(model, example)[1]
    stage = cz.StructuredPruning(target_macs=macs * 0.5, **options)
    result = cz.Pipeline([stage]).run(
        model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    return result.report.row("structured_pruning"), macs


def test_auto_importance_at_a_target_keeps_the_more_accurate_ranking(
    trained_resnet, data, example, tmp_path
):
    """Each candidate pruned to the same MACs and scored; LAMP replaces BatchNorm scale only
    when it scores clearly higher (`clearly_better`), on the trained model and on a copy
    whose most useful channels had their BatchNorm scale moved into the head (the same
    function, BatchNorm scales that rank those channels last)."""
    hidden = copy.deepcopy(trained_resnet)
    with torch.no_grad():
        bn = hidden.down[1]
        top = (hidden.fc.weight.norm(dim=0) * bn.weight.abs()).argsort(descending=True)[:32]
        bn.weight[top] *= 0.01
        bn.bias[top] *= 0.01
        hidden.fc.weight[:, top] *= 100
    for model in (trained_resnet, hidden):
        row, macs = _auto_choice(model, data, example, tmp_path)
        pruning = row.details["pruning"]
        choice = pruning["target"]["importance"]
        trials = {t["importance"]: t for t in choice["trials"]}
        assert list(trials) == ["bn_scale", "lamp"]
        first, second = trials["bn_scale"], trials["lamp"]
        clearly = clearly_better(second["score"], first["score"], choice["samples"])
        best = second if clearly else first
        assert choice["chosen"] == pruning["importance"] == best["importance"]
        assert choice["samples"] == 128  # the whole eval data: fewer than AUTO_SAMPLES
        assert pruning["target"]["ratio"] == best["ratio"] and row.macs <= macs * 0.5
        for t in trials.values():
            assert 0 <= t["score"] <= 1 and 0 < t["ratio"] <= MAX_RATIO


def test_a_ranking_must_score_clearly_higher_to_replace_the_first():
    """Two standard errors of the difference of two accuracies on the inputs scored."""
    assert not clearly_better(0.160, 0.133, 256)  # a depthwise net near chance: noise
    assert not clearly_better(0.715, 0.645, 256)  # 0.070 < 0.082
    assert clearly_better(0.715, 0.645, 1024)  # the same gap on four times the inputs
    assert clearly_better(0.402, 0.121, 256) and clearly_better(0.059, 0.009, 256)
    assert not clearly_better(0.5, 0.6, 256)
    assert clearly_better(-1.0, -2.0, 256)  # a metric outside [0, 1]: any gain counts


def test_auto_importance_is_only_chosen_for_a_target(trained_resnet, data, example, tmp_path):
    stage = cz.StructuredPruning(ratio=0.3)  # a ratio: auto is bn_scale, nothing is tried
    result = cz.Pipeline([stage]).run(
        trained_resnet, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    assert result.report.row("structured_pruning").details["pruning"]["importance"] == "bn_scale"
    row, _ = _auto_choice(trained_resnet, data, example, tmp_path / "l2", importance="l2")
    assert row.details["pruning"]["importance"] == "l2"  # a named importance is kept
    assert "importance" not in row.details["pruning"]["target"]


@pytest.fixture(scope="module")
def wide_data():
    train = DataLoader(synthetic_classification(64, seed=0, size=32), batch_size=32)
    val = DataLoader(synthetic_classification(32, seed=1, size=32), batch_size=32)
    return train, val


@pytest.fixture(scope="module")
def wide_model(wide_data):
    torch.manual_seed(0)
    return fit(TinyResNet(width=64), wide_data[0], epochs=1)


def test_size_target_measures_the_int8_file(wide_model, wide_data, tmp_path):
    int8 = cz.Int8Quantization(calibration_samples=16, fp32_placement=False)
    whole = cz.Pipeline([int8]).run(
        wide_model, *wide_data, output_dir=tmp_path / "whole", progress=False, threads=1,
        throughput_batch=4, runtimes="onnxruntime",
    )  # fmt: skip
    size = whole.onnx_path.stat().st_size / 1e6
    stages = [cz.StructuredPruning(target_size_mb=size / 3, round_to=8), int8]
    result = cz.Pipeline(stages).run(
        wide_model, *wide_data, output_dir=tmp_path / "run", progress=False, threads=1,
        throughput_batch=4, runtimes="onnxruntime",
    )  # fmt: skip
    target = result.report.row("structured_pruning").details["pruning"]["target"]
    assert target["met"] and target["model_value"] == pytest.approx(size, rel=0.02)
    assert all("macs" in t for t in target["trace"])
    final = result.onnx_path.stat().st_size / 1e6
    assert final <= size / 3 * 1.02  # the search's INT8 file is the one written, near enough
    assert f"is {final:.3f} MB" in result.report.target_line()


def test_latency_target_is_searched_in_the_runtime(wide_model, wide_data, tmp_path):
    stages = [
        cz.StructuredPruning(target_latency_ms=1e-6, round_to=8),  # no model is this fast
        cz.Int8Quantization(calibration_samples=16, fp32_placement=False),
    ]
    with pytest.warns(UserWarning, match=r"target_latency_ms 1e-06 ms was not reached"):
        result = cz.Pipeline(stages).run(
            wide_model, *wide_data, output_dir=tmp_path, progress=False, threads=1,
            throughput_batch=4, runtimes="onnxruntime",
        )  # fmt: skip
    row = result.report.row("structured_pruning")
    target = row.details["pruning"]["target"]
    assert not target["met"] and target["runtime"] == "onnxruntime"
    assert target["ratio"] == MAX_RATIO and len(target["trace"]) == 1  # the most pruning, kept
    assert 0 < target["reached"] < target["model_value"]  # timed: pruning made it faster
    assert any("was not reached" in n for n in result.report.notes())
    assert "NOT met" in result.report.target_line()
    assert "the final int8_quantization (onnxruntime int8) measured" in result.report.target_line()


def test_a_measured_target_needs_a_run(trained_resnet, example):
    with pytest.raises(cz.RecipeError, match="measured on the artifact: run it in a Pipeline"):
        cz.StructuredPruning(target_latency_ms=1.0).resolve(trained_resnet, example)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.5, "target_macs": 1e6}, r"give ratio \(0\.5\) or target_macs, not both"),
        (
            {"target_macs": 1e6, "target_size_mb": 1},
            "give one target, not target_macs and target_size_mb",
        ),
        (
            {"target_macs": "lots"},
            r"target_macs must be a positive number of MACs, e\.g\. .* \(got: 'lots'\)",
        ),
        (
            {"target_params": 0},
            r"target_params must be a positive number of parameters, .*\(got: 0\)",
        ),
        ({"target_latency_ms": float("inf")}, r"target_latency_ms must be a positive number of ms"),
        (
            {"target_size_mb": True},
            r"target_size_mb must be a positive number of MB, .*\(got: True\)",
        ),
        (
            {"target_macs": 1e6, "target_runtime": "tvm"},
            r"target_runtime must be one of 'onnxruntime', 'openvino'",
        ),
    ],
)
def test_bad_targets_are_named(options, message):
    with pytest.raises(cz.RecipeError, match=message):
        cz.StructuredPruning(**options)


def test_a_target_above_the_model_is_named(trained_resnet, example):
    with pytest.raises(cz.RecipeError, match=r"target_macs 1G MACs is not below the model's"):
        cz.StructuredPruning(target_macs="1G").resolve(trained_resnet, example)


@pytest.mark.parametrize(
    ("text", "value"), [("150M", 150e6), ("1.5e8", 1.5e8), (" 2g ", 2e9), ("300k", 3e5), (7, 7.0)]
)
def test_amounts(text, value):
    assert parse_amount("s", "target_macs", text) == value


def test_no_target_keeps_the_default_ratio():
    assert cz.StructuredPruning().ratio == 0.5
    stage = cz.StructuredPruning(target_macs="150M")
    assert stage.ratio is None and stage.target == ("target_macs", 150e6)
    again = stages_from_recipe({"stages": [{"structured_pruning": stage.to_dict()}]})[0]
    assert again == stage


def test_a_target_override_replaces_the_recipe_ratio():
    recipe = override_recipe(read_recipe("balanced"), "structured_pruning.target_macs", "150M")
    (pruning,) = [s for s in stages_from_recipe(recipe) if s.name == "structured_pruning"]
    assert pruning.ratio is None and pruning.target_macs == 150e6
    recipe = override_recipe(recipe, "structured_pruning.ratio", 0.3)  # and back
    (pruning,) = [s for s in stages_from_recipe(recipe) if s.name == "structured_pruning"]
    assert pruning.ratio == 0.3 and pruning.target is None


def test_cli_target_flags(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", train=8, val=4)
    argv = ["compress", "--model", "user_models:build", "--data", f"imagefolder:{images}",
            "--input-size", "16", "--batch-size", "16", "--recipe", "fast", "--quiet",
            "--threads", "1", "--throughput-batch", "4", "--epochs", "1", "--round-to", "4"]  # fmt: skip
    assert main([*argv, "--target-macs", "1e4", "--ratio", "0.5"]) == 2
    assert "--ratio and --target-macs: give one of them" in capsys.readouterr().err
    assert main([*argv, "--target-macs", "1e4", "--target-size-mb", "1"]) == 2
    assert "--target-macs and --target-size-mb: give one of them" in capsys.readouterr().err
    assert main([*argv, "--target-params", "many", "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "target_params must be a positive number of parameters" in err
    assert len(err.splitlines()) == 1
    assert main([*argv, "--target-macs", "1T", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not below the model's" in err and len(err.splitlines()) == 1
    assert main([*argv, "--target-macs", "1T", "--print-recipe"]) == 0
    assert "target_macs: 1000000000000.0" in capsys.readouterr().out
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--target-params", "2K", "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (pruning,) = [r for r in report["rows"] if r["name"] == "structured_pruning"]
    assert pruning["details"]["pruning"]["target"]["met"]
    assert pruning["params"] <= 2000


@pytest.mark.parametrize(("first", "kept"), [(0.7, True), (0.2, False)])
def test_search_tries_the_sparsity_ratio_first(first, kept):
    """The search logic alone, on a quantity that falls as (1 - ratio)^2."""
    from compressor.pruning.target import find_ratio

    def measure(ratio: float) -> float:
        return 100 * (1 - ratio) ** 2

    search = find_ratio(
        lambda r: r, measure, "target_macs", 25.0, 100.0, rel_tol=0.01, max_steps=12, first=first
    )
    assert search.trace[0]["ratio"] == first and search.met
    if kept:  # it meets the target: kept, though less pruning would too
        assert search.ratio == first and len(search.trace) == 1
    else:  # it misses: the least pruning above it that meets the target
        assert 0.5 <= search.ratio < 0.51 and all(c["ratio"] > first for c in search.trace[1:])
