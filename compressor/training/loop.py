"""The one training loop, shared by sparsity training and distillation."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import DataError, UserError, first_line
from ..inputs import call, is_image_batch, rows, to_device
from ..models.model_io import logits_of
from . import distributed

if TYPE_CHECKING:
    from ..data import DataSpec
    from ..stage import RunContext

LossAndLogits = tuple[torch.Tensor, torch.Tensor]
ComputeLoss = Callable[[nn.Module, torch.Tensor, Any], "torch.Tensor | LossAndLogits"]
AfterStep = Callable[[int, int], None]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
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
    optimizer_kind: str = "auto",
    record: dict[str, Any] | None = None,
    single_process: bool = False,
) -> list[float]:
    """Fine-tune ``model`` in place on ``ctx.train_data``; return the mean loss per epoch.

    `optimizer_for` the model (``optimizer_kind``: SGD, or AdamW with a linear warm-up over the
    first `WARMUP` of the steps; ``auto``: AdamW for transformers, else SGD; ``probe``: the
    one `probe_optimizer` finds fine-tunes this model best) and a cosine
    learning-rate decay to zero, on ``ctx.device``
    (4-D inputs run channels-last, which is about twice as fast for convs on the CPU).
    ``compute_loss(model, inputs, targets)`` gives the loss of one batch, or ``(loss,
    logits)``; with logits and class-index targets the progress bar also shows the running
    training accuracy. ``after_step(step, total_steps)`` runs after every optimizer step
    (``step`` counts from 1; e.g. a proximal update). The model comes back on the CPU, in
    eval mode, with contiguous tensors.

    ``ctx.mixed_precision`` (``bf16`` or ``fp16``) runs the forward passes in autocast,
    fp16 with a gradient scaler; ``ctx.accumulate_grad_batches`` sums the gradients of that
    many batches per optimizer step. On a GPU the host reads the loss every
    `SYNC_EVERY` batches only, not after each one.

    Under torchrun (`compressor.training.distributed`) every rank calls this together: the model
    trains in DistributedDataParallel on the rank's share of the batches, every rank takes
    the same number of steps, and the losses are averaged over all ranks.

    ``record``, when given, receives ``optimizer``: the kind used and, for ``probe``, the
    trial's losses. ``single_process``: train in this process alone even under torchrun
    (a stage only rank 0 runs).

    Raises:
        DataError: the training data yields no batch.
        UserError: the loss stops being finite (lower the learning rate).
    """
    device = ctx.device
    parallel = distributed.active() and not single_process
    kind, probe = optimizer_kind, None
    if kind == "probe":
        kind, probe = probe_optimizer(model, ctx, compute_loss, lr)
        if parallel:  # every rank trains with rank 0's choice
            kind = distributed.share(kind)
    torch.manual_seed(ctx.seed + distributed.rank())  # dropout differs between ranks
    ctx.train_data.reseed(ctx.seed)
    data = distributed.shard(ctx.train_data, ctx.seed) if parallel else ctx.train_data
    model.to(device).train()
    channels_last = is_image_batch(ctx.train_data.example_input())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, device) if parallel else model
    optimizer = optimizer_for(model, lr, kind=kind)
    if record is not None:  # the kind used (auto resolved), and the probe's trial
        used = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd"
        record["optimizer"] = {"kind": used, **({"probe": probe} if probe else {})}
    per_epoch = data.num_batches(ctx.limit_train_batches)
    if per_epoch is None and (after_step is not None or parallel):  # the step count is needed
        per_epoch = sum(1 for _ in data.iter_batches(ctx.limit_train_batches))
    if parallel:  # every rank takes as many steps, with the same learning rates
        per_epoch = int(distributed.all_min([per_epoch or 0])[0])
    accumulate = ctx.accumulate_grad_batches
    total = epochs * math.ceil(per_epoch / accumulate) if per_epoch else None
    warmup = math.ceil(WARMUP * total) if total and isinstance(optimizer, torch.optim.AdamW) else 0

    def schedule(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))) if total else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.mixed_precision or "")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY  # a host read is free on the CPU
    history: list[float] = []
    step = 0

    def optimizer_step() -> None:
        nonlocal step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if after_step is not None:
            with torch.no_grad():
                after_step(step, max(total or step, step))

    try:
        for epoch in range(epochs):
            bar = tqdm(
                data.iter_batches(per_epoch if parallel else ctx.limit_train_batches),
                total=per_epoch,
                desc=f"{desc} {epoch + 1}/{epochs}",
                disable=None if ctx.progress else True,
                leave=False,
                unit="batch",
            )
            # loss sum, batches, correct, seen: kept on the device, read every sync_every
            tally = torch.zeros(4, dtype=torch.float64, device=device)
            pending = 0  # batches whose gradients wait for an optimizer step
            for index, batch in enumerate(bar):
                inputs = _to_device(data.input_fn(batch), device)
                targets = _to_device(data.target_fn(batch), device)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                pending += 1
                boundary = pending == accumulate or index + 1 == per_epoch
                no_sync = parallel and not boundary  # DDP averages at the boundary only
                with net.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                    with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                        loss, counts = _batch_loss(compute_loss, net, inputs, targets, desc)
                    scaler.scale(loss / accumulate).backward()
                if boundary:
                    optimizer_step()
                    pending = 0
                tally += torch.cat([loss.detach().double().view(1), counts])
                if (index + 1) % sync_every == 0:
                    _check_finite(tally, desc, epoch, lr)
                    bar.set_postfix(_postfix(tally))
            if pending:  # the epoch's last batches (a data set of unknown length)
                optimizer_step()
            # over every rank's batches (a no-op in one process)
            totals = tally.tolist()
            loss_sum, batches, correct, seen = distributed.all_sum(totals) if parallel else totals
            _check_finite(tally, desc, epoch, lr)
            if batches == 0:
                msg = f"{desc}: the training data yielded no batch in epoch {epoch + 1}"
                raise DataError(msg)
            history.append(loss_sum / batches)
            if ctx.progress:
                acc = f", train accuracy {correct / seen:.4f}" if seen else ""
                ranks = f" ({distributed.world_size()} ranks)" if parallel else ""
                ctx.log(f"{desc} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}{acc}{ranks}")
        if parallel:
            distributed.same_buffers(model)
    finally:
        model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return history


SYNC_EVERY = 25  # batches between two reads of the loss on a GPU (each read waits for it)


def _batch_loss(
    compute_loss: ComputeLoss, net: nn.Module, inputs: Any, targets: Any, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss, and ``[1, top-1 hits, samples]`` (hits and samples 0 if unknown)."""
    try:
        loss = compute_loss(net, inputs, targets)
    except IndexError as exc:  # cross-entropy on a class the model lacks
        msg = (
            f"{desc}: a training batch has targets the model's outputs cannot "
            f"take ({first_line(exc)}); give the model one output per class"
        )
        raise DataError(msg) from exc
    logits = None
    if isinstance(loss, tuple):
        loss, logits = loss
    hits = None if logits is None else _correct(logits, targets)
    counts = torch.zeros(3, dtype=torch.float64, device=loss.device)
    counts[0] = 1
    if hits is not None:
        counts[1] = hits
        counts[2] = targets.numel()
    return loss, counts


def _check_finite(tally: torch.Tensor, desc: str, epoch: int, lr: float) -> None:
    """Raise when the running loss sum stopped being finite (a NaN stays in the sum)."""
    loss_sum = float(tally[0])
    if not math.isfinite(loss_sum):
        msg = (
            f"{desc}: the loss became {loss_sum} in epoch {epoch + 1}; "
            f"lower the learning rate (lr={lr})"
        )
        raise UserError(msg)


def _postfix(tally: torch.Tensor) -> dict[str, str]:
    loss_sum, batches, correct, seen = tally.tolist()
    postfix = {"loss": f"{loss_sum / max(batches, 1):.4f}"}
    if seen:
        postfix["acc"] = f"{correct / seen:.3f}"
    return postfix


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
                inputs = to_device(data.input_fn(batch), "cpu")
                call(model, inputs)
                seen += rows(inputs)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return seen


def _correct(logits: torch.Tensor, targets: Any) -> torch.Tensor | None:
    """Top-1 hits in a batch (on its device), when the targets are class indices (one per
    sample, or one per pixel for segmentation)."""
    if (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and logits.dim() == targets.dim() + 1
        and logits.shape[0] == targets.shape[0]
        and logits.shape[2:] == targets.shape[1:]
    ):
        return (logits.detach().argmax(dim=1) == targets).sum()
    return None


PROBE_STEPS = 32  # training batches each candidate optimizer takes in `probe_optimizer`
PROBE_HELD = 8  # the batches after them, on which the candidates' losses are compared


def probe_optimizer(
    model: nn.Module, ctx: RunContext, compute_loss: ComputeLoss, lr: float
) -> tuple[str, dict[str, float]]:
    """The optimizer kind that fine-tunes ``model`` best, by a short trial: a copy of the
    model takes the same `PROBE_STEPS` training batches with each of SGD and AdamW (at the
    rates `optimizer_for` gives them), and the one whose loss on the next `PROBE_HELD`
    batches is lower wins. SGD at a rate meant for SGD-trained networks can throw a network
    trained with Adam far off in a few steps, and AdamW can be too timid for one trained
    with SGD; the trial tells them apart. Returns the kind and each candidate's held-out
    loss (``start``: before any step). With fewer batches than that, a fifth of them (at
    least one) are held out; with one batch, there is no trial: SGD.
    """
    batches = list(itertools.islice(ctx.train_data.iter_batches(), PROBE_STEPS + PROBE_HELD))
    if len(batches) < 2:
        return "sgd", {}
    n_held = min(PROBE_HELD, max(1, len(batches) // 5))
    fit, held = batches[:-n_held], batches[-n_held:]
    data, device = ctx.train_data, ctx.device

    def loss_on(m: nn.Module, batch: Any) -> torch.Tensor:
        inputs = _to_device(data.input_fn(batch), device)
        out = compute_loss(m, inputs, _to_device(data.target_fn(batch), device))
        return out[0] if isinstance(out, tuple) else out

    def held_loss(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(sum(float(loss_on(m, b)) for b in held) / len(held))

    losses = {"start": held_loss(copy.deepcopy(model).to(device))}
    for kind in ("sgd", "adamw"):
        torch.manual_seed(ctx.seed)
        trial = copy.deepcopy(model).to(device).train()
        optimizer = optimizer_for(trial, lr, kind=kind)
        for batch in fit:
            loss = loss_on(trial, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        losses[kind] = held_loss(trial)
        del trial, optimizer
    finite = {k: v for k, v in losses.items() if k != "start" and math.isfinite(v)}
    kind = min(finite, key=finite.__getitem__) if finite else "sgd"
    return kind, {k: round(v, 5) for k, v in losses.items()}


OPTIMIZERS = ("auto", "probe", "sgd", "adamw")
"""What a training stage's ``optimizer`` may be (see `optimizer_for`)."""
ADAMW_LR_SCALE = 0.02  # AdamW's learning rate per unit of the SGD rate a stage is given
WARMUP = 0.1  # AdamW's learning rate rises linearly over this share of the steps


def uses_adamw(model: nn.Module) -> bool:
    """Whether the train loop trains ``model`` with AdamW: it normalises with LayerNorm and
    has no BatchNorm (transformers, ConvNeXt), which SGD trains poorly or not at all."""
    norms = [type(m) for m in model.modules()]
    return any(issubclass(t, nn.LayerNorm) for t in norms) and not any(
        issubclass(t, nn.modules.batchnorm._BatchNorm) for t in norms
    )


def optimizer_for(model: nn.Module, lr: float, kind: str = "auto") -> torch.optim.Optimizer:
    """``sgd``: SGD with Nesterov momentum 0.9 at ``lr``; ``adamw``: AdamW at
    ``lr * ADAMW_LR_SCALE`` (0.05 -> 1e-3, 0.01 -> 2e-4), so one ``lr`` suits both;
    ``auto`` (one of `OPTIMIZERS`): AdamW for a model `uses_adamw` says is a transformer
    (``probe`` is resolved by `train`, see `probe_optimizer`)."""
    if kind == "adamw" or (kind == "auto" and uses_adamw(model)):
        return torch.optim.AdamW(model.parameters(), lr=lr * ADAMW_LR_SCALE, weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)


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
    mixed_precision: str | None = None,
    accumulate_grad_batches: int = 1,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy,
) -> list[float]:
    """Train ``model`` in place with ``loss_fn`` (the CLI's ``--baseline-epochs``);
    cross-entropy by default (`ModelIO.loss_fn` gives the task's).

    For models that arrive untrained (the demo, or ``--model`` without ``--weights``):
    compressing a model that has learned nothing measures nothing but speed and size.
    Under torchrun every rank calls it, and they train data-parallel.
    """
    check_training_options(mixed_precision, accumulate_grad_batches)
    from ..data import as_data_spec
    from ..models.model_io import top1
    from ..stage import RunContext

    distributed.setup()  # under torchrun: every rank trains its share together
    data = as_data_spec(train_data, "train_data")
    ctx = RunContext(
        train_data=data,
        eval_data=data,
        output_dir=Path("."),
        loss_fn=loss_fn,
        eval_fn=top1,
        device=distributed.local_device(resolve_device(device)),
        seed=seed,
        progress=progress and not distributed.is_follower(),
        limit_train_batches=limit_train_batches,
        mixed_precision=mixed_precision,
        accumulate_grad_batches=accumulate_grad_batches,
    )

    def compute_loss(m: nn.Module, inputs: torch.Tensor, targets: Any) -> LossAndLogits:
        logits = logits_of(call(m, inputs))
        return loss_fn(logits, targets), logits

    kind = "adamw" if uses_adamw(model) else "sgd"  # from scratch: nothing to probe
    return train(
        model,
        ctx,
        epochs=epochs,
        lr=lr,
        compute_loss=compute_loss,
        desc="baseline",
        optimizer_kind=kind,
    )


MIXED_PRECISION = ("bf16", "fp16")


def check_training_options(mixed_precision: Any, accumulate_grad_batches: Any) -> None:
    """Raise a `UserError` naming a bad ``mixed_precision`` or ``accumulate_grad_batches``."""
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        msg = (
            f"unknown mixed_precision {mixed_precision!r} (allowed: None, "
            f"{', '.join(repr(m) for m in MIXED_PRECISION)})"
        )
        raise UserError(msg)
    if (
        isinstance(accumulate_grad_batches, bool)
        or not isinstance(accumulate_grad_batches, int)
        or accumulate_grad_batches < 1
    ):
        msg = f"accumulate_grad_batches must be an integer >= 1 (got: {accumulate_grad_batches!r})"
        raise UserError(msg)


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
