"""SparsityTraining: fine-tune with an L1 penalty that pushes whole channels toward zero."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layers import WEIGHTED_LAYERS, find_head, has_batchnorm
from .recipe import register_stage
from .stage import Stage, check_float, check_int
from .training import LossAndLogits, logits_of, train

if TYPE_CHECKING:
    from .pipeline import RunContext, State

NEAR_ZERO = 0.01  # a channel is "near zero" below 1% of its layer's largest channel scale


@register_stage("sparsity_training")
@dataclass(frozen=True)
class SparsityTraining(Stage):
    """Sparsity-regularised fine-tuning: ``L = L0 + l1 * sum(channel scales)``.

    Where the model has BatchNorm, the channel scales are the BatchNorm gammas (network
    slimming, Liu et al. 2017, https://arxiv.org/abs/1708.06519); elsewhere they are the L2
    norms of each output channel's weights in every Conv/Linear but the head (group lasso).
    `StructuredPruning`'s default importance ranks channels by the same quantity.

    Args:
        epochs: passes over the training data.
        l1: weight of the penalty.
        lr: initial learning rate (SGD, cosine decay).
    """

    epochs: int = 2
    l1: float = 1e-4
    lr: float = 0.01

    name = "sparsity_training"

    def __post_init__(self) -> None:
        check_int(self.name, "epochs", self.epochs, minimum=1)
        check_float(self.name, "l1", self.l1, low=0.0)
        check_float(self.name, "lr", self.lr, low=0.0, low_open=True)

    def apply(self, state: State, ctx: RunContext) -> State:
        """Fine-tune a copy of ``state.model`` with the penalty."""
        model = copy.deepcopy(state.model)
        layers = channel_scale_layers(model, state.example_input)
        use_bn = has_batchnorm(model)
        before = channel_scales(layers)

        def compute_loss(m: nn.Module, inputs: torch.Tensor, targets: Any) -> LossAndLogits:
            logits = logits_of(m(inputs))
            loss = ctx.loss_fn(logits, targets)
            penalty = sum(scales.sum() for scales in channel_scales(layers, detach=False))
            return loss + self.l1 * penalty, logits

        history = train(
            model, ctx, epochs=self.epochs, lr=self.lr, compute_loss=compute_loss, desc=ctx.step
        )
        after = channel_scales(layers)
        details = {
            "sparsity": {
                "penalty_on": "batchnorm_scale" if use_bn else "channel_l2_norm",
                "channels": sum(int(s.numel()) for s in after),
                "near_zero_fraction_before": near_zero_fraction(before),
                "near_zero_fraction": near_zero_fraction(after),
                "mean_scale_before": _mean(before),
                "mean_scale": _mean(after),
                "near_zero_rule": f"scale < {NEAR_ZERO:g} x the layer's largest",
            },
            "train_loss": history,
        }
        return state.replace(model=model, details=details)


def channel_scale_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layers whose per-channel scales the penalty acts on (BatchNorms, else Conv/Linear)."""
    if has_batchnorm(model):
        return [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        ]
    head = find_head(model, example_input)
    return [m for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS) and n != head]


def channel_scales(layers: list[nn.Module], *, detach: bool = True) -> list[torch.Tensor]:
    """Per-channel scale of each layer: |gamma| for BatchNorm, the weight L2 norm otherwise."""
    scales = []
    for layer in layers:
        weight = layer.weight.detach() if detach else layer.weight
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            scales.append(weight.abs())
        else:
            scales.append(weight.flatten(1).norm(dim=1))
    return scales


def near_zero_fraction(scales: list[torch.Tensor]) -> float:
    """Share of channels whose scale is below `NEAR_ZERO` times their layer's largest."""
    near = total = 0
    for s in scales:
        if s.numel():
            near += int((s < NEAR_ZERO * s.max()).sum())
            total += s.numel()
    return round(near / total, 4) if total else 0.0


def _mean(scales: list[torch.Tensor]) -> float:
    flat = torch.cat([s.flatten() for s in scales]) if scales else torch.zeros(0)
    return round(float(flat.mean()), 6) if flat.numel() else 0.0
