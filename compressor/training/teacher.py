"""Learning from the original model: the soft-target loss, and a training loss that mixes
it with the task's own, computed against a frozen teacher placed where the student trains.
The distillation stage and sparsity training both use it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from ..inputs import call, is_image_batch
from ..models.model_io import logits_of

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
    """A ``compute_loss`` for `compressor.training.loop.train`: `kd_loss` of the student's
    outputs against the frozen ``teacher``'s (``alpha`` = 0: the task's loss alone, and the
    teacher never runs), plus ``extra()`` when given (a penalty).

    While the context is open the teacher sits on ``ctx.device`` in the student's layout
    (channels-last for image batches like ``example``, else every teacher conv pays for a
    layout conversion); it goes back to the CPU after.
    """
    layout = torch.channels_last if is_image_batch(example) else torch.preserve_format
    if alpha > 0:
        teacher.to(ctx.device, memory_format=layout).eval()
    soft = ctx.io.detection.soft_loss if ctx.io.detection is not None else None

    def compute_loss(m: nn.Module, inputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(call(m, inputs))
        if alpha > 0:
            with torch.no_grad():
                logits_t = logits_of(call(teacher, inputs))
            loss = kd_loss(
                logits,
                logits_t,
                targets,
                temperature=temperature,
                alpha=alpha,
                hard_loss=ctx.loss_fn,
                soft_loss=soft,
            )
        else:
            loss = ctx.loss_fn(logits, targets)
        if extra is not None:
            loss = loss + extra()
        return loss, logits

    try:
        yield compute_loss
    finally:
        if alpha > 0:
            teacher.to("cpu", memory_format=torch.contiguous_format)
