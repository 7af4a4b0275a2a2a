"""Distillation: fine-tune the current model against the original one as teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..stage import Stage, check_choice, check_float, check_int, register_stage
from .loop import OPTIMIZERS, train
from .teacher import teacher_loss

if TYPE_CHECKING:
    from ..stage import RunContext, State


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
            ``probe`` (the one a short trial finds fine-tunes this model best, see
            `compressor.training.loop.probe_optimizer`), ``sgd`` or ``adamw``.
    """

    epochs: int = 3
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 0.01
    optimizer: str = "auto"

    name = "distillation"
    phase = "training"
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
        record: dict[str, Any] = {}
        with teacher_loss(
            state.teacher,
            ctx,
            state.example_input,
            temperature=self.temperature,
            alpha=self.alpha,
        ) as compute_loss:
            history = train(
                student,
                ctx,
                epochs=self.epochs,
                lr=self.lr,
                optimizer_kind=self.optimizer,
                compute_loss=compute_loss,
                desc=ctx.step,
                record=record,
            )
        return state.replace(model=student, details={"train_loss": history, **record})
