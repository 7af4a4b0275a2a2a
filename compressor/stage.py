"""What a stage is and what it is given: the Stage base class, the stage registry, the
state record stages hand each other, the run context, and the option validators.

A stage is a frozen dataclass whose fields are its options; it validates them in
`__post_init__` (so a bad option fails before any training) and does its work in
`apply(state, ctx) -> State`. Stage modules import this module only, never the pipeline
and never each other: a stage that needs another's service asks for it here, through a
protocol (`Quantizer`, `RatioPruner`) and the run context (`RunContext.quantizer`,
`default_quantizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from .data import EVAL_ROWS, as_data_spec, grouped
from .errors import ModelError, RecipeError, UserError
from .inputs import shape_text
from .models.layers import call_naming_layer
from .models.model_io import ModelIO, resolve_io

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from .data import DataSpec
    from .row import Row
    from .runtime.measure import EvalFn


class Stage:
    """Base class of pipeline stages.

    Subclasses are ``@dataclass(frozen=True)`` classes. Class attributes:
    ``name`` is the stage's recipe key and report row name; ``runtime`` says where the
    pipeline measures the stage's result: ``"torch"`` (``state.model``) or
    ``"onnxruntime"`` (``state.onnx_path``); ``precision`` is the report row's precision;
    ``replaces`` maps an option to those a recipe override of it unsets; ``trains`` is True
    for stages that train with `compressor.training.loop.train`: under torchrun every rank runs
    them together (data-parallel), while rank 0 alone runs the rest. ``prepares`` is True
    for a stage whose work aims at the stages after it (sparsity training aims at the
    pruning that follows): a search that changes those stages runs it again per candidate.
    ``phase`` names the part of the run the stage's time counts to in the report
    (``training``, ``pruning``, ``quantization``; default: its name).
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = ""
    runtime: ClassVar[str] = "torch"
    precision: ClassVar[str] = "fp32"
    trains: ClassVar[bool] = False
    prepares: ClassVar[bool] = False
    replaces: ClassVar[Mapping[str, tuple[str, ...]]] = {}

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


STAGES: dict[str, type[Stage]] = {}

S = TypeVar("S", bound=type[Stage])


def register_stage(name: str) -> Callable[[S], S]:
    """Class decorator: make a stage available to recipes under ``name``."""

    def register(cls: S) -> S:
        if name in STAGES:
            msg = f"a stage named {name!r} is already registered ({STAGES[name].__qualname__})"
            raise RecipeError(msg)
        STAGES[name] = cls
        return cls

    return register


@runtime_checkable
class Quantizer(Protocol):
    """A stage that writes INT8 ONNX files; other stages time or size their candidates
    through it (`RunContext.quantizer`, `default_quantizer`) without importing it."""

    def quantize_sample(
        self,
        fp32: Path,
        out: Path,
        ctx: RunContext,
        *,
        samples: int = 8,
        placement: bool = True,
        budget: bool = False,
    ) -> tuple[Path, dict[str, Any] | None]:
        """``fp32`` quantized into ``out`` as the stage would, calibrated on ``samples``
        training inputs; with ``budget``, also what its accuracy budget would revert."""
        ...

    def quantize_layer(self, fp32: Path, out: Path, data: DataSpec, *, samples: int) -> Path:
        """A small ONNX file (one layer) quantized with the stage's settings into ``out``."""
        ...


@runtime_checkable
class RatioPruner(Protocol):
    """A stage that prunes by a ratio a search can change (`Pipeline`'s budget search)."""

    ratio: float
    target: tuple[str, float] | None

    def at_ratio(self, ratio: float) -> Stage:
        """The same stage pruning ``ratio`` of the channels."""
        ...

    def pruned_size(self, model: nn.Module, example: torch.Tensor, threads: int) -> Any:
        """What ``model`` keeps, pruned by this stage: (params, MACs)."""
        ...


def default_quantizer() -> Quantizer:
    """The registered quantizing stage with its default options (for a stage that must time
    INT8 layers with no run or no quantizing stage after it)."""
    for cls in STAGES.values():
        if issubclass(cls, Quantizer):
            return cls()
    msg = "no quantizing stage is registered (import compressor registers the INT8 stage)"
    raise RecipeError(msg)


LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class State:
    """What one stage hands the next; small and plain so a run can be checkpointed.

    Attributes:
        model: the current torch model (CPU), owned by the pipeline, never the user's.
        teacher: a frozen copy of the model as given (the distillation teacher).
        example_input: one input sample with a batch axis of 1 (tracing, export, MACs).
        onnx_path: the latest ONNX artifact a stage produced, if any.
        rows: the measurements taken so far (baseline first).
        details: what the running stage reports about itself; it goes into its report row.
    """

    model: nn.Module
    teacher: nn.Module
    example_input: torch.Tensor
    onnx_path: Path | None = None
    rows: tuple[Row, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> State:
        """A copy of the state with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunContext:
    """The run's fixed inputs and settings, passed to every stage beside the state.

    ``step`` is the running stage's report name; ``upcoming`` the stages after it (sparsity
    training aims at the pruning that follows it). ``mixed_precision`` (None, ``bf16`` or
    ``fp16``) and ``accumulate_grad_batches`` are how the training stages train.
    ``min_accuracy`` is the lowest final accuracy a pipeline's accuracy budget allows
    (None: no budget); the INT8 stage keeps nodes in FP32 to stay above it.
    ``full_evaluation`` evaluates every row in its own runtime, even a file shown to give
    the same answers as one already evaluated; ``recorded`` holds the outputs of the ONNX
    files evaluated so far, by path, for the final parity (`compressor.pipeline.rows`).
    """

    train_data: DataSpec
    eval_data: DataSpec
    output_dir: Path
    loss_fn: LossFn
    eval_fn: EvalFn
    device: torch.device
    seed: int = 0
    threads: int = 1
    progress: bool = True
    limit_train_batches: int | None = None
    mixed_precision: str | None = None
    accumulate_grad_batches: int = 1
    throughput_batches: tuple[int, ...] = (32,)
    runtimes: tuple[str, ...] = ("onnxruntime",)
    min_accuracy: float | None = None
    io: ModelIO = field(default_factory=ModelIO)
    custom_metric: bool = False
    full_evaluation: bool = False
    step: str = ""
    upcoming: tuple[Stage, ...] = ()
    recorded: dict[Path, Any] = field(default_factory=dict, repr=False)

    def quantizer(self) -> Quantizer | None:
        """The first stage after the running one that writes INT8 files, if any."""
        return next((s for s in self.upcoming if isinstance(s, Quantizer)), None)

    @functools.cached_property
    def eval_batches(self) -> DataSpec:
        """The eval data as the rows are evaluated: for the library's metrics, small batches
        joined to the first throughput batch size (`grouped`, worked out once per context),
        so that the evaluation pass also gives the throughput."""
        if self.custom_metric:
            return self.eval_data
        return grouped(self.eval_data, (*self.throughput_batches, EVAL_ROWS)[0])

    def measure_settings(self) -> dict[str, Any]:
        """The keyword arguments every row's measurement shares (same data, threads, batch)."""
        return {
            "data": self.eval_batches,
            "eval_fn": self.eval_fn,
            "threads": self.threads,
            "throughput_batches": self.throughput_batches,
        }

    def log(self, message: str) -> None:
        """Print a progress line to stderr unless progress is off."""
        if self.progress:
            print(f"[compressor] {message}", file=sys.stderr, flush=True)


def resolve_data_io(
    io: ModelIO | None, model: nn.Module, data: DataSpec, what: str = "the data"
) -> tuple[nn.Module, ModelIO]:
    """`resolve_io` on the first batch of ``data``, with the library's errors (``what``
    names the data in them)."""
    example = data.example_input()  # names an empty data set
    batch = next(data.iter_batches(1))
    targets = data.target_fn(batch)
    try:
        return call_naming_layer(
            model, lambda: resolve_io(io, model, example, targets), f"a forward pass on {what}"
        )
    except (ModelError, UserError):
        raise
    except Exception as exc:
        msg = f"the model cannot run on {what} (input shape {shape_text(example)}): {exc}"
        raise ModelError(msg) from exc


def standalone_context(
    model: nn.Module,
    train_data: Any,
    eval_data: Any,
    output_dir: Path,
    *,
    io: ModelIO | None = None,
    threads: int | None = None,
    progress: bool = False,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    step: str = "",
    names: tuple[str, str] = ("train_data", "eval_data"),
) -> tuple[nn.Module, RunContext]:
    """A run context for a stage used outside a pipeline (`compressor.quantize`): ``model``
    (wrapped in `SelectOutput` when its output is not a tensor) and the context, on the CPU."""
    from .runtime.measure import default_threads

    train = as_data_spec(train_data, names[0])
    evaluation = as_data_spec(eval_data, names[1])
    model, io = resolve_data_io(io, model, train, names[0])
    ctx = RunContext(
        train_data=train,
        eval_data=evaluation,
        output_dir=output_dir,
        loss_fn=io.loss_fn(),
        eval_fn=io.eval_fn(),
        device=torch.device("cpu"),
        threads=threads or default_threads(),
        progress=progress,
        runtimes=runtimes,
        io=io,
        step=step,
    )
    return model, ctx
