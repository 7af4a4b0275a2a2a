"""The one data contract: an iterable of batches plus how to read inputs and targets.

`DataSpec` feeds training, calibration and evaluation alike. A plain ``DataLoader`` that
yields ``(inputs, targets)`` needs no wrapping: `as_data_spec` wraps it with the defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DataError


def _first(batch: Any) -> Any:
    return batch[0]


def _second(batch: Any) -> Any:
    return batch[1]


@dataclass(frozen=True)
class DataSpec:
    """Batches and the functions that pick a batch's model input and target.

    Args:
        batches: any re-iterable of batches, e.g. a ``torch.utils.data.DataLoader``.
        input_fn: batch -> model input tensor (default: ``batch[0]``).
        target_fn: batch -> target (default: ``batch[1]``).
    """

    batches: Iterable[Any]
    input_fn: Callable[[Any], torch.Tensor] = _first
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

    def example_input(self) -> torch.Tensor:
        """The first sample's input, with a batch axis of 1, on the CPU."""
        for batch in self.batches:
            inputs = self.input_fn(batch)
            if not isinstance(inputs, torch.Tensor):
                msg = (
                    "the data's input_fn must return a torch.Tensor "
                    f"(got: {type(inputs).__name__}); pass DataSpec(loader, input_fn=...)"
                )
                raise DataError(msg)
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                msg = f"the first batch has no samples (input shape: {tuple(inputs.shape)})"
                raise DataError(msg)
            return inputs[:1].detach().cpu()
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
        count += int(spec.input_fn(batch).shape[0])
        if count >= samples:
            break
    return DataSpec(batches, input_fn=spec.input_fn, target_fn=spec.target_fn)
