"""Learning from the original model: the soft-target loss, `DistillationLoss` (it mixed with
the task's own loss against a frozen teacher, for any training loop), and the training loss
the distillation stage and sparsity training build from it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..inputs import call, is_image_batch
from ..models.model_io import ModelIO, logits_of, pick_output
from ..stage import check_float

if TYPE_CHECKING:
    from ..stage import LossFn, RunContext


def kd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    targets: Any,
    *,
    temperature: float,
    alpha: float,
    hard_loss: LossFn,
    soft_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard_loss(student, targets)``.

    The KL divergence is over the class axis (1) and averaged over every other position:
    per sample for ``(N, C)`` logits, per pixel for ``(N, C, H, W)`` (segmentation).
    ``soft_loss(student, teacher, T)`` replaces the ``T^2 * KL`` term for outputs that are
    not class scores on axis 1 (a detector's, `DetectionHead.soft_loss`).
    The soft-target gradients scale as 1/T^2, so multiplying by T^2 keeps the soft and hard
    terms' relative contributions unchanged when T changes (Hinton et al. 2015,
    https://arxiv.org/abs/1503.02531).
    """
    t = temperature
    if soft_loss is not None:
        return alpha * soft_loss(logits_s, logits_t, t) + (1 - alpha) * hard_loss(logits_s, targets)
    soft = F.kl_div(
        F.log_softmax(logits_s / t, dim=1),
        F.log_softmax(logits_t / t, dim=1),
        reduction="sum",
        log_target=True,
    ) / max(1, logits_s.numel() // max(1, logits_s.shape[1]))
    return alpha * t * t * soft + (1 - alpha) * hard_loss(logits_s, targets)


class DistillationLoss(nn.Module):
    """The distillation stage's loss, for any training loop: `kd_loss` of the student's
    outputs against the frozen teacher's, ``alpha`` weighing the soft targets and
    ``1 - alpha`` the task's loss on the targets.

    Call it with the student's outputs, the inputs the teacher runs on (or the teacher's
    outputs, ``teacher_outputs=``) and the targets. Outputs are read through the model IO
    description: a tensor, a mapping (``out``, ``logits``, ...), an object with ``logits``
    (Hugging Face), a tuple (its first tensor), or what ``io.output`` names. The teacher
    runs in eval mode without gradients (it is never trained, and never in the module's
    parameters), moved to the inputs' device when it is elsewhere.

    Example:
        >>> kd = cz.DistillationLoss(teacher, temperature=4.0, alpha=0.7)  # doctest: +SKIP
        >>> loss = kd(student(x), x, y)                                    # doctest: +SKIP

    Args:
        teacher: the original model (not changed).
        temperature: softmax temperature of the soft targets (> 0).
        alpha: weight of the soft-target term, in [0, 1].
        loss_fn: the task's loss ``loss_fn(outputs, targets)``; the io's default
            (cross-entropy; per pixel for segmentation) when None.
        io: which output to distil and the task (`ModelIO`); inferred when None.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        temperature: float = 4.0,
        alpha: float = 0.7,
        *,
        loss_fn: LossFn | None = None,
        io: ModelIO | None = None,
    ) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, nn.Module):
            msg = f"teacher must be a torch.nn.Module (got: {type(teacher).__name__})"
            raise UserError(msg)
        check_float("DistillationLoss", "temperature", temperature, low=0.0, low_open=True)
        check_float("DistillationLoss", "alpha", alpha, low=0.0, high=1.0)
        if teacher is None and alpha > 0:
            raise UserError("DistillationLoss: a teacher is needed when alpha > 0")
        self.io = io or ModelIO()
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.loss_fn = loss_fn or self.io.loss_fn()
        self.soft_loss = self.io.detection.soft_loss if self.io.detection is not None else None
        # kept out of the module tree: the student's optimizer and state_dict never see it
        self.__dict__["teacher"] = teacher

    def forward(
        self,
        student_outputs: Any,
        inputs: Any = None,
        targets: Any = None,
        *,
        teacher_outputs: Any = None,
    ) -> torch.Tensor:
        """The loss of one batch (see the class docstring)."""
        logits = self.select(student_outputs)
        if self.alpha == 0:
            return self.loss_fn(logits, targets)
        if teacher_outputs is None:
            if inputs is None:
                raise UserError("DistillationLoss: give the inputs or teacher_outputs=")
            teacher_outputs = self.teacher_outputs(inputs)
        return kd_loss(
            logits,
            self.select(teacher_outputs),
            targets,
            temperature=self.temperature,
            alpha=self.alpha,
            hard_loss=self.loss_fn,
            soft_loss=self.soft_loss,
        )

    def select(self, outputs: Any) -> torch.Tensor:
        """The tensor distilled in a model's ``outputs`` (``io.output``, else inferred)."""
        if self.io.output is not None:
            return pick_output(outputs, self.io.output)
        return logits_of(outputs)

    @torch.no_grad()
    def teacher_outputs(self, inputs: Any) -> Any:
        """The frozen teacher's outputs on ``inputs`` (it moves to their device)."""
        teacher = self.teacher
        device = _device_of(inputs)
        if device is not None and next(teacher.parameters(), torch.empty(0)).device != device:
            layout = torch.channels_last if is_image_batch(inputs) else torch.preserve_format
            teacher.to(device, memory_format=layout)
        was_training = teacher.training
        teacher.eval()
        try:
            return call(teacher, inputs)
        finally:
            teacher.train(was_training)


def _device_of(inputs: Any) -> torch.device | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
    return None


@contextlib.contextmanager
def teacher_loss(
    teacher: nn.Module,
    ctx: RunContext,
    example: Any,
    *,
    temperature: float,
    alpha: float,
    extra: Callable[[], torch.Tensor] | None = None,
) -> Iterator[Callable[[nn.Module, Any, Any], tuple[torch.Tensor, torch.Tensor]]]:
    """A ``compute_loss`` for `compressor.training.loop.train`: `DistillationLoss` of the
    student's outputs against the frozen ``teacher``'s (``alpha`` = 0: the task's loss
    alone, and the teacher never runs), plus ``extra()`` when given (a penalty).

    While the context is open the teacher sits on ``ctx.device`` in the student's layout
    (channels-last for image batches like ``example``, else every teacher conv pays for a
    layout conversion); it goes back to the CPU after.
    """
    layout = torch.channels_last if is_image_batch(example) else torch.preserve_format
    if alpha > 0:
        teacher.to(ctx.device, memory_format=layout).eval()
    loss_of = DistillationLoss(
        teacher if alpha > 0 else None,
        temperature,
        alpha,
        loss_fn=ctx.loss_fn,
        io=dataclasses.replace(ctx.io, output=None),  # the pipeline's model gives a tensor
    )

    def compute_loss(m: nn.Module, inputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = call(m, inputs)
        logits = loss_of.select(outputs)
        loss = loss_of(outputs, inputs, targets)
        if extra is not None:
            loss = loss + extra()
        return loss, logits

    try:
        yield compute_loss
    finally:
        if alpha > 0:
            teacher.to("cpu", memory_format=torch.contiguous_format)
