"""One description of a model's inputs and outputs: `ModelIO`.

Everything after it (pruning, distillation, export, calibration, measuring, parity, the
report) works on one output tensor and one metric. `ModelIO` says which output that is and
which task the model solves, and `resolve_io` fills in what the user left out from the
model and one batch:

- the output: a tensor as it is; from a mapping its ``out`` (torchvision segmentation) or
  ``logits`` entry, from an object its ``.logits`` (Hugging Face), from a tuple its first
  element. A model whose output is not a tensor runs wrapped in `SelectOutput`.
- the task: ``classification`` when the output is ``(N, C)`` and the targets ``(N,)``
  class indices; ``segmentation`` when the output is ``(N, C, H, W)`` and the targets
  ``(N, H, W)`` class indices per pixel; ``detection`` when an adapter knows the model as
  a whole detector (torchvision's SSDs): it runs as its dense part, and ``detection``
  holds the `DetectionHead` that decodes, trains and scores its ``(N, A, 4 + C)`` output.
- the metric and loss: top-1 and cross-entropy for classification; mean intersection over
  union (`mean_iou`) and per-pixel cross-entropy, both skipping ``ignore_index``, for
  segmentation; COCO mAP (`compressor.models.detection.mean_ap`) and SSD's loss for detection.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError, UserError
from ..inputs import call
from . import detection as det
from .adapters import dense_detector

TASKS = ("classification", "segmentation", "detection")
METRICS = {"classification": "top1", "segmentation": "miou", "detection": "map"}
METRIC_LABELS = {"top1": "accuracy", "miou": "mIoU", "map": "mAP", "custom": "metric"}
OUTPUT_KEYS = ("out", "logits")  # tried in this order in a mapping output


@dataclass(frozen=True)
class ModelIO:
    """Which of a model's outputs compressor compares and distils, and the task it solves.

    Args:
        output: a key of a mapping output (``"out"``), an attribute of an output object
            (``"logits"``), or an index into a tuple output; None infers it.
        task: ``"classification"``, ``"segmentation"`` or ``"detection"``; None infers
            it from the model, the output and the targets of the first training batch.
        ignore_index: the target value segmentation's loss and metric skip (e.g. borders).
        detection: for a detector's dense model (one ``(N, A, 4 + C)`` output), the
            `compressor.models.detection.DetectionHead` that decodes, trains and scores it; made
            by the model's adapter for torchvision's SSDs.

    Example:
        >>> import compressor as cz
        >>> cz.ModelIO(output="out", task="segmentation").metric
        'miou'
    """

    output: str | int | None = None
    task: str | None = None
    ignore_index: int = 255
    detection: det.DetectionHead | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.output is not None and (
            isinstance(self.output, bool) or not isinstance(self.output, (str, int))
        ):
            msg = (
                "ModelIO.output must be a key, an attribute name or an index "
                f"(got: {self.output!r})"
            )
            raise UserError(msg)
        if self.task is not None and self.task not in TASKS:
            msg = f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}"
            raise UserError(msg)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            msg = f"ModelIO.ignore_index must be an int (got: {self.ignore_index!r})"
            raise UserError(msg)
        if self.detection is not None and not isinstance(self.detection, det.DetectionHead):
            msg = (
                "ModelIO.detection must be a compressor.models.detection.DetectionHead "
                f"(got: {type(self.detection).__name__})"
            )
            raise UserError(msg)
        if self.detection is not None and self.task not in (None, "detection"):
            msg = f"ModelIO.detection is for task 'detection' (got task {self.task!r})"
            raise UserError(msg)

    @property
    def metric(self) -> str | None:
        """The task's default metric: ``top1`` or ``miou`` (None while the task is unknown)."""
        return METRICS.get(self.task or "")

    def loss_fn(self) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """The task's default loss: cross-entropy (per pixel for segmentation), the
        detection head's loss for detection."""
        if self.detection is not None:
            return self.detection.loss
        if self.task == "segmentation":
            return functools.partial(F.cross_entropy, ignore_index=self.ignore_index)
        return F.cross_entropy

    def eval_fn(self) -> Callable[[Any, Any], float]:
        """The task's default metric as an ``eval_fn(predict, data)``."""
        if self.detection is not None:
            return functools.partial(det.mean_ap, head=self.detection)
        if self.task == "segmentation":
            return functools.partial(mean_iou, ignore_index=self.ignore_index)
        return top1

    def to_dict(self, *, custom_metric: bool = False) -> dict[str, Any]:
        """Plain data for the report (``metric`` is ``custom`` for a user's eval_fn)."""
        return {
            "task": self.task,
            "output": self.output,
            "metric": "custom" if custom_metric else self.metric,
            **({"ignore_index": self.ignore_index} if self.task == "segmentation" else {}),
            **({"detection": self.detection.to_dict()} if self.detection is not None else {}),
        }

    def labels(self, output: torch.Tensor) -> torch.Tensor:
        """The classes an output predicts, compared between FP32 and INT8: per sample or
        per pixel the best class (axis 1); per anchor for a detector (its class scores)."""
        if self.detection is not None:
            return self.detection.split(output)[1].argmax(-1)
        return output.argmax(dim=1)


def pick_output(outputs: Any, key: str | int | None) -> Any:
    """The output ``key`` names in a model's ``outputs`` (``outputs`` itself for None)."""
    if key is None:
        return outputs
    if isinstance(key, int) and isinstance(outputs, (tuple, list)):
        return outputs[key]
    if isinstance(key, str) and isinstance(outputs, Mapping):
        return outputs[key]
    if isinstance(key, str) and hasattr(outputs, key):
        return getattr(outputs, key)
    msg = f"the model's output ({type(outputs).__name__}) has no {key!r}"
    raise ModelError(msg)


def infer_output(outputs: Any) -> str | int | None:
    """The key of the tensor to compare and distil in ``outputs``, as the module doc says.

    Raises:
        ModelError: no tensor is found; the message says what to pass as ``ModelIO.output``.
    """
    if isinstance(outputs, torch.Tensor):
        return None
    if isinstance(outputs, Mapping):
        for key in (*OUTPUT_KEYS, *outputs):
            if key in outputs and isinstance(outputs[key], torch.Tensor):
                return key
    elif isinstance(getattr(outputs, "logits", None), torch.Tensor):
        return "logits"
    elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return 0
    keys = f" with keys {list(outputs)[:5]}" if isinstance(outputs, Mapping) else ""
    msg = (
        f"cannot find the output tensor in the model's {type(outputs).__name__}{keys}: "
        "name it with cz.ModelIO(output=KEY_OR_INDEX)"
    )
    raise ModelError(msg)


def logits_of(outputs: Any) -> torch.Tensor:
    """The tensor to compare and distil in a model's ``outputs``, found by `infer_output`."""
    return pick_output(outputs, infer_output(outputs))


class SelectOutput(nn.Module):
    """Runs ``model`` and returns the one output ``key`` names (see `pick_output`).

    The pipeline wraps a model whose output is not a tensor in it, so the compressed model
    and the ONNX files have one output; ``.model`` is the wrapped model.
    """

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The chosen output of ``model(*args, **kwargs)``."""
        return pick_output(self.model(*args, **kwargs), self.key)


def infer_task(output: torch.Tensor, targets: Any) -> str | None:
    """``classification`` or ``segmentation`` from an output and its batch's targets."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    if output.dim() == 2 and targets.dim() == 1:
        return "classification"
    if output.dim() == 4 and targets.dim() == 3 and output.shape[-2:] == targets.shape[-2:]:
        return "segmentation"
    return None


def resolve_io(
    io: ModelIO | None, model: nn.Module, example: torch.Tensor, targets: Any
) -> tuple[nn.Module, ModelIO]:
    """``model`` (wrapped in `SelectOutput` when its output is not a tensor) and ``io``
    with its output and task filled in from one forward pass on ``example``.

    A task that cannot be inferred stays None (then the user's ``eval_fn`` and ``loss_fn``
    decide everything, as for classification).

    Raises:
        ModelError: the output cannot be found, or is not a tensor.
        UserError: ``io`` is not a `ModelIO`.
    """
    io = ModelIO() if io is None else io
    if not isinstance(io, ModelIO):
        msg = f"io must be a cz.ModelIO (got: {type(io).__name__})"
        raise UserError(msg)
    found = dense_detector(model, example) if io.detection is None else None
    if found is not None:  # a whole detector: its dense part, and what follows it
        model, head = found
        io = dataclasses.replace(io, task="detection", detection=head)
    elif io.task == "detection" and io.detection is None:
        msg = (
            f"task 'detection' needs a detector compressor knows (torchvision's SSDs; got "
            f"{type(model).__name__}), or its dense model with "
            "cz.ModelIO(detection=cz.DetectionHead(...))"
        )
        raise UserError(msg)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = call(model, example)
    finally:
        model.train(was_training)
    key = infer_output(outputs) if io.output is None else io.output
    output = pick_output(outputs, key)
    if not isinstance(output, torch.Tensor):
        msg = (
            f"the model's output {key!r} is a {type(output).__name__}, not a tensor: name "
            "the tensor to compare and distil with cz.ModelIO(output=...)"
        )
        raise ModelError(msg)
    if key is not None and not isinstance(model, SelectOutput):
        model = SelectOutput(model, key)
    if io.detection is not None:
        io.detection.split(output)  # the output fits the head: (N, A, 4 + C)
        return model, dataclasses.replace(io, output=key, task="detection")
    task = io.task or infer_task(output, targets[:1] if _batched(targets) else targets)
    if task is None and output.dim() == 2:
        task = "classification"  # e.g. soft or unusual targets with a user's loss
    return model, ModelIO(output=key, task=task, ignore_index=io.ignore_index)


def _batched(targets: Any) -> bool:
    return isinstance(targets, torch.Tensor) and targets.dim() >= 1


def check_targets(output: torch.Tensor, targets: Any, io: ModelIO, what: str) -> str | None:
    """Why the class-index ``targets`` do not fit ``output``'s classes (None: they fit)."""
    if io.detection is not None:
        return _check_boxes(output, targets, what)
    if (
        io.task not in TASKS
        or not isinstance(targets, torch.Tensor)
        or targets.is_floating_point()
        or targets.dim() != output.dim() - 1
    ):
        return None
    classes = output.shape[1]
    values = targets[targets != io.ignore_index] if io.task == "segmentation" else targets
    if not values.numel():
        return None
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < classes:
        return None
    skip = f" (besides ignore_index {io.ignore_index})" if io.task == "segmentation" else ""
    return (
        f"{what} has class {high if high >= classes else low}{skip}, but the model has "
        f"{classes} outputs (classes 0..{classes - 1}): give the model as many outputs as "
        "the data has classes"
    )


def _check_boxes(output: torch.Tensor, targets: Any, what: str) -> str | None:
    """Why detection ``targets`` do not fit a dense ``(N, A, 4 + C)`` output (None: fit)."""
    try:
        det.check_targets(targets)
    except UserError as exc:
        return f"{what}: {exc}"
    classes = output.shape[-1] - 4
    labels = targets[..., 0][targets[..., 0] != det.PAD]
    if not labels.numel():
        return None
    low, high = int(labels.min()), int(labels.max())
    if low >= 1 and high < classes:
        return None
    return (
        f"{what} has object class {low if low < 1 else high}, but the detector scores "
        f"classes 1..{classes - 1} (0 is the background): give it as many classes as the "
        "data has, plus one"
    )


def top1(predict: Callable[[Any], torch.Tensor], data: Any) -> float:
    """Top-1 accuracy of ``predict`` over all of ``data`` (the default metric)."""
    correct = total = 0
    for batch in data:
        logits = predict(data.input_fn(batch))
        targets = torch.as_tensor(data.target_fn(batch))
        correct += int((logits.argmax(dim=1).cpu() == targets.cpu()).sum())
        total += int(targets.numel())
    return correct / total if total else float("nan")


def mean_iou(predict: Any, data: Any, *, ignore_index: int = 255) -> float:
    """Mean intersection over union of ``predict`` over all of ``data`` (segmentation).

    Per class, IoU = pixels predicted and labelled as it / pixels predicted or labelled
    as it, summed over the whole data set; the mean is over the classes that occur in the
    labels or the predictions. Pixels labelled ``ignore_index`` count for nothing.
    """
    confusion: torch.Tensor | None = None
    for batch in data:
        scores = predict(data.input_fn(batch))
        targets = torch.as_tensor(data.target_fn(batch)).cpu().long()
        classes = scores.shape[1]
        predicted = scores.argmax(dim=1).cpu()
        keep = targets != ignore_index
        index = targets[keep] * classes + predicted[keep]
        counts = torch.bincount(index, minlength=classes * classes).view(classes, classes)
        confusion = counts if confusion is None else confusion + counts
    if confusion is None:
        return float("nan")
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean()) if present.any() else float("nan")
