"""The one training loop, shared by sparsity training and distillation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .errors import DataError, UserError, first_line

if TYPE_CHECKING:
    from .data import DataSpec
    from .stage import RunContext

LossAndLogits = tuple[torch.Tensor, torch.Tensor]
ComputeLoss = Callable[[nn.Module, torch.Tensor, Any], "torch.Tensor | LossAndLogits"]
AfterStep = Callable[[int, int], None]


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits tensor of a model's outputs (first element of a tuple, or ``.logits``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs:
        return logits_of(outputs[0])
    msg = f"cannot find the logits in the model's output of type {type(outputs).__name__}"
    raise UserError(msg)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def train(
    model: nn.Module,
    ctx: RunContext,
    *,
    epochs: int,
    lr: float,
    compute_loss: ComputeLoss,
    desc: str,
    after_step: AfterStep | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``ctx.train_data``; return the mean loss per epoch.

    SGD with Nesterov momentum and a cosine learning-rate decay to zero, on ``ctx.device``
    (4-D inputs run channels-last, which is about twice as fast for convs on the CPU).
    ``compute_loss(model, inputs, targets)`` gives the loss of one batch, or ``(loss,
    logits)``; with logits and class-index targets the progress bar also shows the running
    training accuracy. ``after_step(step, total_steps)`` runs after every optimizer step
    (``step`` counts from 1; e.g. a proximal update). The model comes back on the CPU, in
    eval mode, with contiguous tensors.

    Raises:
        DataError: the training data yields no batch.
        UserError: the loss stops being finite (lower the learning rate).
    """
    data = ctx.train_data
    device = ctx.device
    torch.manual_seed(ctx.seed)
    data.reseed(ctx.seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    per_epoch = data.num_batches(ctx.limit_train_batches)
    if per_epoch is None and after_step is not None:  # a schedule needs the step count
        per_epoch = sum(1 for _ in data.iter_batches(ctx.limit_train_batches))
    total = epochs * per_epoch if per_epoch else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))) if total else 1.0,
    )
    channels_last = data.example_input().dim() == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    history: list[float] = []
    step = 0
    try:
        for epoch in range(epochs):
            bar = tqdm(
                data.iter_batches(ctx.limit_train_batches),
                total=per_epoch,
                desc=f"{desc} {epoch + 1}/{epochs}",
                disable=None if ctx.progress else True,
                leave=False,
                unit="batch",
            )
            loss_sum, batches, correct, seen = 0.0, 0, 0, 0
            for batch in bar:
                inputs = _to_device(data.input_fn(batch), device)
                targets = _to_device(data.target_fn(batch), device)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                try:
                    loss = compute_loss(model, inputs, targets)
                except IndexError as exc:  # cross-entropy on a class the model lacks
                    msg = (
                        f"{desc}: a training batch has targets the model's outputs cannot "
                        f"take ({first_line(exc)}); give the model one output per class"
                    )
                    raise DataError(msg) from exc
                if isinstance(loss, tuple):
                    loss, logits = loss
                    hits = _correct(logits, targets)
                    if hits is not None:
                        correct, seen = correct + hits, seen + int(targets.shape[0])
                if not torch.isfinite(loss):
                    msg = (
                        f"{desc}: the loss became {float(loss.detach())} in epoch {epoch + 1}; "
                        f"lower the learning rate (lr={lr})"
                    )
                    raise UserError(msg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if after_step is not None:
                    with torch.no_grad():
                        after_step(step, max(total or step, step))
                loss_sum += float(loss.detach())
                batches += 1
                postfix = {"loss": f"{loss_sum / batches:.4f}"}
                if seen:
                    postfix["acc"] = f"{correct / seen:.3f}"
                bar.set_postfix(postfix)
            if batches == 0:
                msg = f"{desc}: the training data yielded no batch in epoch {epoch + 1}"
                raise DataError(msg)
            history.append(loss_sum / batches)
            if ctx.progress:
                acc = f", train accuracy {correct / seen:.4f}" if seen else ""
                ctx.log(f"{desc} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}{acc}")
    finally:
        model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return history


def recalibrate_batchnorm(model: nn.Module, data: DataSpec, batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches.

    Only the BatchNorm layers are in training mode (Dropout and stochastic depth stay off);
    weights are not touched. Returns the number of samples seen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    seen = 0
    model.eval()
    for m in norms:
        m.train()
    try:
        with torch.no_grad():
            for batch in data.iter_batches(batches):
                inputs = data.input_fn(batch).cpu()
                model(inputs)
                seen += inputs.shape[0]
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return seen


def _correct(logits: torch.Tensor, targets: Any) -> int | None:
    """Top-1 hits in a batch, when the targets are class indices for these logits."""
    if (
        isinstance(targets, torch.Tensor)
        and targets.dim() == 1
        and not targets.is_floating_point()
        and logits.dim() == 2
        and logits.shape[0] == targets.shape[0]
    ):
        return int((logits.detach().argmax(dim=1) == targets).sum())
    return None


def fit_baseline(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: int,
    lr: float = 0.05,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    limit_train_batches: int | None = None,
) -> list[float]:
    """Train ``model`` in place with cross-entropy (the CLI's ``--baseline-epochs``).

    For models that arrive untrained (the demo, or ``--model`` without ``--weights``):
    compressing a model that has learned nothing measures nothing but speed and size.
    """
    from .data import as_data_spec
    from .measure import top1
    from .stage import RunContext

    data = as_data_spec(train_data, "train_data")
    ctx = RunContext(
        train_data=data,
        eval_data=data,
        output_dir=Path("."),
        loss_fn=F.cross_entropy,
        eval_fn=top1,
        device=resolve_device(device),
        seed=seed,
        progress=progress,
        limit_train_batches=limit_train_batches,
    )

    def compute_loss(m: nn.Module, inputs: torch.Tensor, targets: Any) -> LossAndLogits:
        logits = logits_of(m(inputs))
        return F.cross_entropy(logits, targets), logits

    return train(model, ctx, epochs=epochs, lr=lr, compute_loss=compute_loss, desc="baseline")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; CUDA when available if None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        msg = f"unknown device {device!r} (allowed: 'cpu', 'cuda', 'cuda:N')"
        raise UserError(msg) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} was asked for, but CUDA is not available here (use 'cpu')"
        raise UserError(msg)
    return resolved
