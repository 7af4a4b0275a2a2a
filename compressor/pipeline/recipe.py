"""Recipes: the stage registry, and YAML/dict recipes <-> lists of stages.

A recipe is ``{"stages": [{"structured_pruning": {"ratio": 0.5}}, ...]}``; each entry names
one registered stage and its options. Beside ``stages``, a recipe may hold the pipeline's
options (`PIPELINE_OPTIONS`): ``max_accuracy_drop``, its accuracy budget, and
``max_search_minutes``, the time box of its pruning-ratio search under that budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..stage import STAGES, Stage

PRESETS = ("fast", "balanced", "max-compression")
"""Recipes shipped in compressor/pipeline/recipes/NAME.yaml; docs/recipes.md compares them."""
PIPELINE_OPTIONS = ("max_accuracy_drop", "max_search_minutes")
"""Recipe keys beside ``stages``: options of the whole pipeline."""


def stage_from_dict(name: str, options: Mapping[str, Any] | None = None) -> Stage:
    """Build the registered stage ``name`` with ``options``."""
    if name not in STAGES:
        msg = f"unknown stage {name!r} (allowed: {', '.join(STAGES)})"
        raise RecipeError(msg)
    if options is not None and not isinstance(options, Mapping):
        msg = f"options of stage {name!r} must be a mapping (got: {options!r})"
        raise RecipeError(msg)
    return STAGES[name].from_dict(options)


def stages_from_recipe(recipe: Mapping[str, Any]) -> list[Stage]:
    """Turn a recipe mapping (``{"stages": [...]}``) into stages, validating every entry."""
    if not isinstance(recipe, Mapping):
        msg = f"a recipe must be a mapping with a 'stages' list (got: {type(recipe).__name__})"
        raise RecipeError(msg)
    unknown = sorted(set(recipe) - {"stages", *PIPELINE_OPTIONS})
    if unknown:
        msg = f"unknown recipe key {unknown[0]!r} (allowed: stages, {', '.join(PIPELINE_OPTIONS)})"
        raise RecipeError(msg)
    recipe_options(recipe)  # validated here too, before any stage is built
    entries = recipe.get("stages")
    if not isinstance(entries, list) or not entries:
        msg = f"recipe 'stages' must be a non-empty list (got: {entries!r})"
        raise RecipeError(msg)
    stages = []
    for entry in entries:
        if isinstance(entry, str):
            stages.append(stage_from_dict(entry))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            ((name, options),) = entry.items()
            stages.append(stage_from_dict(name, options))
        else:
            msg = f"each recipe stage must be a name or a one-key mapping (got: {entry!r})"
            raise RecipeError(msg)
    return stages


def recipe_options(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline options a recipe mapping sets (validated), for `Pipeline`."""
    options = {k: recipe[k] for k in PIPELINE_OPTIONS if k in recipe}
    if "max_accuracy_drop" in options:
        check_budget(options["max_accuracy_drop"])
    if "max_search_minutes" in options:
        check_search_minutes(options["max_search_minutes"])
    return options


def check_budget(value: Any) -> float | None:
    """``max_accuracy_drop`` as a float in [0, 1), or None; else a `RecipeError`."""
    if value is None:
        return None
    if not _is_real(value) or not 0 <= value < 1:
        msg = (
            f"max_accuracy_drop must be a fraction in [0, 1), e.g. 0.005 for half a point "
            f"(got: {value!r})"
        )
        raise RecipeError(msg)
    return float(value)


def check_search_minutes(value: Any) -> float | None:
    """``max_search_minutes`` as a positive float, or None; else a `RecipeError`."""
    if value is None:
        return None
    if not _is_real(value) or value <= 0:
        msg = f"max_search_minutes must be a number of minutes > 0, e.g. 30 (got: {value!r})"
        raise RecipeError(msg)
    return float(value)


def _is_real(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_recipe(source: str | Path) -> dict[str, Any]:
    """The recipe mapping in a YAML file, or of a shipped preset (see `PRESETS`)."""
    if isinstance(source, str) and source in PRESETS:
        path: Any = resources.files("compressor.pipeline") / "recipes" / f"{source}.yaml"
    else:
        path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = (
            f"cannot read recipe {str(path)!r}: {exc.strerror or exc} "
            f"(presets: {', '.join(PRESETS)})"
        )
        raise RecipeError(msg) from exc
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"recipe {str(path)!r} is not valid YAML: {exc}".replace("\n", " ")
        raise RecipeError(msg) from exc
    if not isinstance(recipe, dict):
        msg = f"recipe {str(path)!r} must be a mapping with a 'stages' list"
        raise RecipeError(msg)
    return recipe


def load_recipe(source: str | Path) -> list[Stage]:
    """Read a YAML recipe file (or a preset name) and return its stages."""
    return stages_from_recipe(read_recipe(source))


def override_recipe(recipe: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of a valid ``recipe`` mapping with one option set.

    ``key`` is ``stage.option`` (every stage of that name) or a bare ``option`` (every stage
    in the recipe that takes it, e.g. ``epochs``). Options the stage says it replaces
    (`Stage.replaces`: a pruning target replaces the ratio) are unset.

    Raises:
        RecipeError: no stage in the recipe takes that option.
    """
    stage_name, _, option = key.rpartition(".")
    normalized = recipe_to_dict(stages_from_recipe(recipe))["stages"]
    if key in PIPELINE_OPTIONS:
        recipe_options({key: value})
        return {**recipe_options(recipe), key: value, "stages": normalized}
    stages, hits = [], 0
    for entry in normalized:
        ((name, options),) = entry.items()
        if option in options and stage_name in ("", name):
            unset = dict.fromkeys(STAGES[name].replaces.get(option, ()))
            options = {**options, **unset, option: value}
            hits += 1
        stages.append({name: options})
    if not hits:
        where = f"stage {stage_name!r}" if stage_name else "stage"
        present = ", ".join(next(iter(e)) for e in normalized)
        msg = (
            f"no {where} in the recipe takes option {option!r} (its stages: {present}); "
            "use --set STAGE.OPTION=VALUE with one of them, or add the stage to the recipe"
        )
        raise RecipeError(msg)
    return {**recipe_options(recipe), "stages": stages}


def recipe_to_dict(stages: Iterable[Stage], **options: Any) -> dict[str, Any]:
    """The recipe mapping for ``stages`` (every option filled in) and the pipeline
    ``options`` (`PIPELINE_OPTIONS`; those that are None are left out)."""
    unknown = sorted(set(options) - set(PIPELINE_OPTIONS))
    if unknown:
        msg = f"unknown pipeline option {unknown[0]!r} (allowed: {', '.join(PIPELINE_OPTIONS)})"
        raise RecipeError(msg)
    kept = {k: options[k] for k in PIPELINE_OPTIONS if options.get(k) is not None}
    return {**kept, "stages": [{stage.name: stage.to_dict()} for stage in stages]}


def recipe_to_yaml(stages: Iterable[Stage], **options: Any) -> str:
    """The recipe for ``stages`` and the pipeline ``options`` as YAML text."""
    return yaml.safe_dump(recipe_to_dict(stages, **options), sort_keys=False)
