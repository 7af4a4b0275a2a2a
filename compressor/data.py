"""The one data contract: an iterable of batches plus how to read inputs and targets.

`DataSpec` feeds training, calibration and evaluation alike. A plain ``DataLoader`` that
yields ``(inputs, targets)`` needs no wrapping: `as_data_spec` wraps it with the defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DataError
from .inputs import Inputs, cat, check_inputs, rows, take, to_device


def _first(batch: Any) -> Any:
    return batch[0]


def _second(batch: Any) -> Any:
    return batch[1]


@dataclass(frozen=True)
class DataSpec:
    """Batches and the functions that pick a batch's model input and target.

    Args:
        batches: any re-iterable of batches, e.g. a ``torch.utils.data.DataLoader``.
        input_fn: batch -> model input: a tensor, or a dict of named tensors such as
            ``{"input_ids": ..., "attention_mask": ...}`` (default: ``batch[0]``).
        target_fn: batch -> target (default: ``batch[1]``).
    """

    batches: Iterable[Any]
    input_fn: Callable[[Any], Inputs] = _first
    target_fn: Callable[[Any], Any] = _second

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def iter_batches(self, limit: int | None = None) -> Iterator[Any]:
        """Iterate the batches, stopping after ``limit`` of them when given."""
        return iter(self.batches) if limit is None else itertools.islice(self.batches, limit)

    def num_batches(self, limit: int | None = None) -> int | None:
        """Number of batches one pass yields, when the iterable knows its length."""
        try:
            n = len(self.batches)  # type: ignore[arg-type]
        except TypeError:
            return limit
        return n if limit is None else min(n, limit)

    def reseed(self, seed: int) -> None:
        """Start the data order afresh from ``seed``.

        A DataLoader that shuffles with its own generator draws its order from it, so a
        stage's order would depend on what ran before it; the pipeline reseeds it (and
        torch's global generator) at every stage, so a resumed run sees the same data in
        the same order as an uninterrupted one.
        """
        sampler = getattr(self.batches, "sampler", None)
        generators = {
            id(g): g
            for g in (getattr(self.batches, "generator", None), getattr(sampler, "generator", None))
        }
        for generator in generators.values():
            if isinstance(generator, torch.Generator):
                generator.manual_seed(seed)

    def example_input(self) -> Inputs:
        """The first sample's input (a tensor or named tensors, see `compressor.inputs`),
        with a batch axis of 1, on the CPU."""
        for batch in self.batches:
            return take(to_device(check_inputs(self.input_fn(batch)), "cpu"), 0, 1)
        msg = "the data set is empty: its first pass yielded no batch"
        raise DataError(msg)


def as_data_spec(data: Any, what: str) -> DataSpec:
    """Wrap ``data`` (a DataSpec or an iterable of batches) as a `DataSpec`."""
    if isinstance(data, DataSpec):
        return data
    if (
        data is None
        or isinstance(data, (str, bytes, torch.Tensor))
        or not hasattr(data, "__iter__")
    ):
        msg = (
            f"{what} must be an iterable of batches such as a DataLoader, or a DataSpec "
            f"(got: {type(data).__name__})"
        )
        raise DataError(msg)
    return DataSpec(data)


def data_subset(data: Any, samples: int) -> DataSpec:
    """The first batches of ``data`` holding at least ``samples`` inputs, kept in memory."""
    spec = as_data_spec(data, "data")
    batches, count = [], 0
    for batch in spec:
        batches.append(batch)
        count += rows(spec.input_fn(batch))
        if count >= samples:
            break
    return DataSpec(batches, input_fn=spec.input_fn, target_fn=spec.target_fn)


EVAL_ROWS = 32
"""Rows per evaluation batch when the eval data's own batches are smaller (`grouped`); a run
groups to its first throughput batch size instead (default 32), so that the evaluation pass
also times the throughput (`compressor.runtime.measure.CallTimes`)."""
EVAL_BYTES = 64 * 2**20
"""The most input bytes one grouped evaluation batch holds."""


def grouped(
    spec: DataSpec, rows_per_batch: int = EVAL_ROWS, max_bytes: int = EVAL_BYTES
) -> DataSpec:
    """``spec`` with consecutive batches joined into batches of about ``rows_per_batch`` rows
    (at most ``max_bytes`` of inputs), so evaluating it runs few large calls instead of many
    small ones; the same samples in the same order. Returned unchanged when its batches are
    that large already or its targets are not tensors (detection's per-image lists)."""
    first = next(spec.iter_batches(1), None)
    if first is None:
        return spec
    inputs, targets = spec.input_fn(first), spec.target_fn(first)
    if not isinstance(targets, torch.Tensor) or rows(inputs) >= rows_per_batch:
        return spec
    return DataSpec(_Grouped(spec, rows_per_batch, max_bytes))


@dataclass(frozen=True)
class _Grouped:
    spec: DataSpec
    rows_per_batch: int
    max_bytes: int

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        inputs: list[Inputs] = []
        targets: list[torch.Tensor] = []
        count = size = 0
        shape: tuple[Any, ...] | None = None
        for batch in self.spec:
            x, y = self.spec.input_fn(batch), self.spec.target_fn(batch)
            tensors = list(x.values()) if isinstance(x, Mapping) else [x]
            this = (*(t.shape[1:] for t in tensors), y.shape[1:])
            if inputs and this != shape:  # e.g. another sequence length: not joinable
                yield cat(inputs), torch.cat(targets)
                inputs, targets, count, size = [], [], 0, 0
            shape = this
            inputs.append(x)
            targets.append(y)
            count += rows(x)
            size += sum(t.numel() * t.element_size() for t in tensors)
            if count >= self.rows_per_batch or size >= self.max_bytes:
                yield cat(inputs), torch.cat(targets)
                inputs, targets, count, size = [], [], 0, 0
        if inputs:
            yield cat(inputs), torch.cat(targets)
