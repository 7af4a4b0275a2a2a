"""Distillation: fine-tune the current model against the original one as teacher."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from ..inputs import call, is_image_batch
from ..models.model_io import logits_of
from ..stage import Stage, check_choice, check_float, check_int, register_stage
from .loop import OPTIMIZERS, LossAndLogits, train

if TYPE_CHECKING:
    from ..stage import LossFn, RunContext, State


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


@register_stage("distillation")
@dataclass(frozen=True)
class Distillation(Stage):
    """Knowledge distillation from the original model (frozen) into the current one.

    Args:
        epochs: passes over the training data.
        temperature: softmax temperature of the soft targets (> 0).
        alpha: weight of the soft-target term, in [0, 1]; ``1 - alpha`` weighs the hard loss.
        lr: initial learning rate (cosine decay to zero; AdamW runs at ``lr`` x 0.02).
        optimizer: ``auto`` (AdamW for a transformer, SGD with Nesterov momentum else),
            ``sgd`` or ``adamw``.
    """

    epochs: int = 3
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 0.01
    optimizer: str = "auto"

    name = "distillation"
    trains = True

    def __post_init__(self) -> None:
        check_int(self.name, "epochs", self.epochs, minimum=1)
        check_float(self.name, "temperature", self.temperature, low=0.0, low_open=True)
        check_float(self.name, "alpha", self.alpha, low=0.0, high=1.0)
        check_float(self.name, "lr", self.lr, low=0.0, low_open=True)
        check_choice(self.name, "optimizer", self.optimizer, OPTIMIZERS)

    def apply(self, state: State, ctx: RunContext) -> State:
        """Distil ``state.teacher`` into a copy of ``state.model``."""
        student = copy.deepcopy(state.model)
        # Match the student's channels-last layout in `train` (4-D inputs), else every
        # teacher conv pays for a layout conversion.
        layout = (
            torch.channels_last if is_image_batch(state.example_input) else torch.preserve_format
        )
        teacher = state.teacher.to(ctx.device, memory_format=layout).eval()

        def compute_loss(m: nn.Module, inputs: torch.Tensor, targets: Any) -> LossAndLogits:
            with torch.no_grad():
                logits_t = logits_of(call(teacher, inputs))
            logits = logits_of(call(m, inputs))
            loss = kd_loss(
                logits,
                logits_t,
                targets,
                temperature=self.temperature,
                alpha=self.alpha,
                hard_loss=ctx.loss_fn,
                soft_loss=ctx.io.detection.soft_loss if ctx.io.detection is not None else None,
            )
            return loss, logits

        try:
            history = train(
                student,
                ctx,
                epochs=self.epochs,
                lr=self.lr,
                optimizer_kind=self.optimizer,
                compute_loss=compute_loss,
                desc=ctx.step,
            )
        finally:
            teacher.to("cpu", memory_format=torch.contiguous_format)
        return state.replace(model=student, details={"train_loss": history})
