"""Property-based tests (hypothesis) over recipes and stage options.

Whatever a recipe holds, building it either works, and then the recipe round-trips
through dicts and YAML, or raises one `RecipeError` (a `UserError`): never another
exception.
"""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressor as cz
from compressor.pipeline.recipe import STAGES, recipe_to_yaml, stage_from_dict

NAMES = sorted(STAGES)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10_000),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["auto", "whole", "dims", "global", "minmax", "entropy", "l1", "x", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))


@st.composite
def stage_entries(draw):
    """A recipe entry: a stage name (sometimes unknown) and options (sometimes unknown)."""
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))
    fields = STAGES[name].option_names() if name in STAGES else []
    keys = (
        st.one_of(st.sampled_from(fields), st.text(max_size=6)) if fields else st.text(max_size=6)
    )
    options = draw(st.dictionaries(keys, values, max_size=4))
    return draw(st.sampled_from([name, {name: options}, {name: None}]))


recipes = st.one_of(
    st.fixed_dictionaries({"stages": st.lists(stage_entries(), max_size=4)}),
    st.dictionaries(st.text(max_size=6), st.lists(stage_entries(), max_size=2), max_size=2),
    values,
)


@SETTINGS
@given(recipes)
def test_any_recipe_builds_or_gives_one_recipe_error(recipe):
    try:
        pipeline = cz.Pipeline.from_recipe(recipe)
    except cz.RecipeError as exc:
        message = str(exc).strip()
    else:
        message = None
    if message is not None:
        assert message  # says what is wrong
        return
    again = cz.Pipeline.from_recipe(pipeline.to_recipe())
    assert again.stages == pipeline.stages
    from_yaml = cz.Pipeline.from_recipe(yaml.safe_load(recipe_to_yaml(pipeline.stages)))
    assert from_yaml.stages == pipeline.stages


@SETTINGS
@given(st.sampled_from(NAMES), st.data())
def test_stage_options_are_validated_when_built(name, data):
    fields = STAGES[name].option_names()
    if not fields:
        return
    options = data.draw(st.dictionaries(st.sampled_from(fields), values, min_size=1, max_size=3))
    try:
        stage = stage_from_dict(name, options)
    except cz.RecipeError:
        return
    assert stage_from_dict(name, stage.to_dict()) == stage


@SETTINGS
@given(st.lists(st.sampled_from(NAMES), min_size=2, max_size=5))
def test_a_torch_stage_after_an_onnx_stage_is_always_refused(names):
    stages = [stage_from_dict(n) for n in names]
    runtimes = [s.runtime for s in stages]
    bad = "onnxruntime" in runtimes and "torch" in runtimes[runtimes.index("onnxruntime") :]
    try:
        cz.Pipeline(stages)
    except cz.RecipeError:
        assert bad
    else:
        assert not bad
