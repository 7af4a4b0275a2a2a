"""Do two predictors give the same answers: agreement and output differences over data or
a sample, and recorded outputs of one evaluation pass reused for a later comparison."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ..data import DataSpec
from ..inputs import Inputs
from ..models.model_io import ModelIO
from .measure import Predict


def compare_outputs(
    reference: Predict,
    candidate: Predict,
    data: DataSpec,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Top-1 agreement (per sample, per pixel for segmentation, per anchor for detection:
    the classes ``labels(output)`` gives, default argmax over axis 1) and output
    differences of two predictors over all of ``data``."""

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in data:
            inputs = data.input_fn(batch)
            yield reference(inputs), candidate(inputs)

    return compare_pairs(pairs(), labels)


def compare_pairs(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """`compare_outputs` over ``(reference, candidate)`` output pairs already computed."""
    agree = total = positions = 0
    max_diff = sum_diff = 0.0
    elements = 0
    for ref, out in pairs:
        ref, out = ref.float(), out.float()
        if out.shape != ref.shape:
            msg = f"output shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}"
            raise ValueError(msg)
        diff = (out - ref).abs()
        max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
        sum_diff += float(diff.sum())
        elements += diff.numel()
        if ref.dim() >= 2:
            classes = labels or ModelIO().labels
            same = classes(out) == classes(ref)
            agree += int(same.sum())
            positions += same.numel()
        total += int(ref.shape[0]) if ref.dim() else 1
    return {
        "top1_agreement": round(agree / positions, 6) if positions else None,
        "max_abs_diff": round(max_diff, 6),
        "mean_abs_diff": round(sum_diff / elements, 6) if elements else None,
        "samples": total,
    }


def sample_parity(
    reference: Predict,
    candidate: Predict,
    sample: Inputs,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 2e-3,
) -> dict[str, Any]:
    """`compare_outputs` of two predictors on one batch ``sample``, and ``same_answers``:
    every prediction agrees and the outputs are within ``atol + rtol * max|reference|``
    (the export check's tolerance): then one's accuracy stands for the other's."""
    ref, out = reference(sample).float(), candidate(sample).float()
    found = compare_pairs([(ref, out)], labels)
    tolerance = atol + rtol * (float(ref.abs().max()) if ref.numel() else 0.0)
    agreement = found["top1_agreement"]
    found["tolerance"] = round(tolerance, 6)
    found["same_answers"] = (agreement is None or agreement == 1.0) and found[
        "max_abs_diff"
    ] <= tolerance
    return found


class OutputRecorder:
    """The outputs a predictor gives over one evaluation pass, kept (up to ``max_bytes``)
    with a fingerprint of each input, so that a later comparison of two files over the same
    data reuses them instead of running both again (`compare_recorded`)."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.outputs: list[torch.Tensor] = []
        self.keys: list[tuple[Any, ...]] = []
        self.complete = True
        self._bytes = 0

    def wrap(self, predict: Predict) -> Predict:
        """``predict``, recording what it returns."""

        def recording(inputs: Inputs) -> torch.Tensor:
            out = predict(inputs)
            if self.complete:
                kept = out.detach().float().cpu()
                self._bytes += kept.numel() * 4
                if self._bytes > self.max_bytes:  # too large to keep: compare by running
                    self.complete = False
                    self.outputs.clear()
                    self.keys.clear()
                else:
                    self.outputs.append(kept)
                    self.keys.append(_fingerprint(inputs))
            return out

        return recording


def compare_recorded(
    reference: OutputRecorder,
    candidate: OutputRecorder,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """`compare_outputs` from two recordings of the same inputs in the same order; None
    when either is incomplete or their inputs differ (then compare by running)."""
    if not (reference.complete and candidate.complete) or not reference.outputs:
        return None
    if reference.keys != candidate.keys:
        return None
    return compare_pairs(zip(reference.outputs, candidate.outputs, strict=True), labels)


def _fingerprint(inputs: Inputs) -> tuple[Any, ...]:
    """Shape and a weighted sum of up to `_FINGERPRINT_VALUES` evenly spaced values of each
    input: enough to tell two passes over different data apart, at a fraction of reading
    every value (a 64-image batch at 224x224 is 9.6 million of them)."""
    tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    return tuple((tuple(t.shape), _weighted_sample_sum(t)) for t in tensors)


_FINGERPRINT_VALUES = 65536


def _weighted_sample_sum(tensor: torch.Tensor) -> float:
    flat = tensor.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _FINGERPRINT_VALUES)].double()
    weights = torch.arange(1, sample.numel() + 1, dtype=torch.float64)
    return float((sample * weights).sum())
