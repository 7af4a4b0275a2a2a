import pytest

import compressor as cz
from compressor.pipeline.recipe import (
    STAGES,
    load_recipe,
    recipe_to_yaml,
    stage_from_dict,
    stages_from_recipe,
)
from compressor.stage import register_stage

ALL = [
    cz.SparsityTraining(epochs=1, l1=1e-3),
    cz.StructuredPruning(ratio=0.3, ignored_layers=("stem.0",), round_to=None),
    cz.Distillation(temperature=2.0),
    cz.Int8Quantization(method="entropy", reduce_range=True),
]


@pytest.mark.parametrize("stage", ALL, ids=lambda s: s.name)
def test_every_stage_round_trips_through_its_dict(stage):
    rebuilt = type(stage).from_dict(stage.to_dict())
    assert rebuilt == stage
    assert stage_from_dict(stage.name, stage.to_dict()) == stage


def test_every_registered_stage_is_covered():
    stage_from_dict("distillation")  # loads the built-in registry
    assert {s.name for s in ALL} == set(STAGES)


def test_recipe_round_trips_through_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(ALL))
    assert load_recipe(path) == ALL


BAD = [
    (cz.StructuredPruning, {"ratio": 0}, r"structured_pruning\.ratio .* \(got: 0\)"),
    (
        cz.StructuredPruning,
        {"ratio": 1.5},
        r"ratio must be a number in \(0\.0, 1\.0\) \(got: 1\.5\)",
    ),
    (
        cz.StructuredPruning,
        {"importance": "taylor"},
        r"importance must be one of 'auto'.*\(got: 'taylor'\)",
    ),
    (cz.StructuredPruning, {"round_to": 0}, r"round_to must be an integer >= 1 \(got: 0\)"),
    (cz.StructuredPruning, {"ignored_layers": "fc"}, r"ignored_layers must be a list"),
    (
        cz.SparsityTraining,
        {"epochs": 0},
        r"sparsity_training\.epochs must be an integer >= 1 \(got: 0\)",
    ),
    (cz.SparsityTraining, {"l1": -1.0}, r"l1 must be a number in \[0\.0, inf\) \(got: -1\.0\)"),
    (cz.SparsityTraining, {"lr": "fast"}, r"lr must be a number .*\(got: 'fast'\)"),
    (cz.Distillation, {"temperature": 0.0}, r"temperature .*\(got: 0\.0\)"),
    (cz.Distillation, {"alpha": 1.2}, r"alpha must be a number in \[0\.0, 1\.0\] \(got: 1\.2\)"),
    (cz.Distillation, {"epochs": 2.5}, r"epochs must be an integer"),
    (
        cz.Int8Quantization,
        {"method": "max"},
        r"method must be one of 'minmax', 'entropy', 'percentile' \(got: 'max'\)",
    ),
    (
        cz.Int8Quantization,
        {"calibration_samples": 0},
        r"calibration_samples must be an integer >= 1",
    ),
    (
        cz.Int8Quantization,
        {"per_channel": "yes"},
        r"per_channel must be true or false \(got: 'yes'\)",
    ),
    (cz.Int8Quantization, {"opset": 13}, r"opset must be an integer >= 17 \(got: 13\)"),
    (cz.Int8Quantization, {"activation_type": "fp8"}, r"activation_type must be one of"),
    (
        cz.Int8Quantization,
        {"detector_max_accuracy_drop": 2.0},
        r"detector_max_accuracy_drop must be a number in \[0, 1\] \(got: 2\.0\)",
    ),
]


@pytest.mark.parametrize(
    ("cls", "options", "match"), BAD, ids=[f"{c.name}-{next(iter(o))}" for c, o, _ in BAD]
)
def test_bad_option_names_option_value_and_allowed(cls, options, match):
    with pytest.raises(cz.RecipeError, match=match):
        cls(**options)


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(
        cz.RecipeError,
        match=r"unknown option 'ratoi' for stage 'structured_pruning' \(allowed: ratio, importance",
    ):
        stage_from_dict("structured_pruning", {"ratoi": 0.5})


def test_unknown_stage_lists_the_allowed_ones():
    with pytest.raises(
        cz.RecipeError, match=r"unknown stage 'prune' \(allowed: .*structured_pruning"
    ):
        stages_from_recipe({"stages": [{"prune": {}}]})


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"stages": []}, "non-empty list"),
        ({"stage": []}, "unknown recipe key 'stage'"),
        ([1], "must be a mapping"),
        ({"stages": [{"a": 1, "b": 2}]}, "one-key mapping"),
    ],
    ids=["empty", "typo-key", "not-mapping", "two-keys"],
)
def test_malformed_recipes_are_rejected(recipe, match):
    with pytest.raises(cz.RecipeError, match=match):
        stages_from_recipe(recipe)


def test_bad_yaml_and_missing_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(cz.RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(cz.RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_registering_a_duplicate_name_raises():
    with pytest.raises(cz.RecipeError, match="already registered"):
        register_stage("distillation")(type("Other", (cz.Stage,), {}))


def test_pipeline_rejects_non_stages():
    with pytest.raises(cz.RecipeError, match="must be Stage instances"):
        cz.Pipeline(["structured_pruning"])


def test_repeated_stages_get_numbered_row_names():
    pipeline = cz.Pipeline([cz.Distillation(), cz.StructuredPruning(), cz.Distillation()])
    assert pipeline.step_names() == ["distillation", "structured_pruning", "distillation_2"]
