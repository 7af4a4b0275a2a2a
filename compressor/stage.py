"""The Stage base class and the option validators the stages share.

A stage is a frozen dataclass whose fields are its options; it validates them in
`__post_init__` (so a bad option fails before any training) and does its work in
`apply(state, ctx) -> State`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import RecipeError

if TYPE_CHECKING:
    from .pipeline import RunContext, State


class Stage:
    """Base class of pipeline stages.

    Subclasses are ``@dataclass(frozen=True)`` classes. Class attributes:
    ``name`` is the stage's recipe key and report row name; ``runtime`` says where the
    pipeline measures the stage's result: ``"torch"`` (``state.model``) or
    ``"onnxruntime"`` (``state.onnx_path``); ``precision`` is the report row's precision.
    """

    name: ClassVar[str] = ""
    runtime: ClassVar[str] = "torch"
    precision: ClassVar[str] = "fp32"

    def apply(self, state: State, ctx: RunContext) -> State:
        """Run the stage on ``state`` and return the next state."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The stage's options as plain data (the recipe form)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this stage takes (its dataclass fields)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> Stage:
        """Build the stage from recipe options; unknown options are a `RecipeError`."""
        options = dict(options or {})
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            msg = (
                f"unknown option {unknown[0]!r} for stage {cls.name!r} "
                f"(allowed: {', '.join(allowed)})"
            )
            raise RecipeError(msg)
        return cls(**options)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def check_int(stage: str, option: str, value: Any, *, minimum: int) -> None:
    """Raise `RecipeError` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{stage}.{option} must be an integer >= {minimum} (got: {value!r})"
        raise RecipeError(msg)


def check_float(
    stage: str,
    option: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise `RecipeError` unless ``value`` is a real number in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        msg = f"{stage}.{option} must be a number in {left}{low}, {high}{right} (got: {value!r})"
        raise RecipeError(msg)


def check_choice(stage: str, option: str, value: Any, choices: Collection[Any]) -> None:
    """Raise `RecipeError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        msg = f"{stage}.{option} must be one of {allowed} (got: {value!r})"
        raise RecipeError(msg)


def check_bool(stage: str, option: str, value: Any) -> None:
    """Raise `RecipeError` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        msg = f"{stage}.{option} must be true or false (got: {value!r})"
        raise RecipeError(msg)
