"""Quantization-aware training of an INT8 file, for when post-training INT8 loses too much.

`quantization_aware_training` fine-tunes the QDQ file the INT8 stage made (the same types,
per-channel weights, FP32 placement and kept nodes: `QDQModule` computes that very graph
with fake quantization) against the original model as teacher, with the run's training
loop, and writes the file with the trained weights and scales. The scales stop learning
for the last `FREEZE` of the steps, so that the weights settle on the grid they ship on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from ..inputs import Inputs, call
from ..training.loop import train
from ..training.teacher import teacher_loss
from .qdq_module import QDQModule

if TYPE_CHECKING:
    from ..stage import RunContext

FREEZE = 0.25
"""The last share of QAT's steps, in which the scales stay fixed."""


def quantization_aware_training(
    int8_path: Path,
    fp32_path: Path,
    teacher: nn.Module,
    ctx: RunContext,
    out_dir: Path,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "auto",
    temperature: float = 4.0,
    alpha: float = 0.7,
    weight_qmax: int = 127,
    learn_scales: bool = True,
) -> tuple[Path, Path, dict[str, Any]]:
    """Fine-tune the QDQ file ``int8_path`` against ``teacher`` (distillation, as the
    distillation stage does) on ``ctx.train_data``; write it with the trained values.

    Args:
        int8_path: the QDQ INT8 file (its FP32 nodes stay FP32 and train too).
        fp32_path: the FP32 file it was quantized from: weights start from its values.
        teacher: the original model (frozen).
        ctx: the run (training data, device, seed, eval data and metric).
        out_dir: where the two files go.
        epochs, lr, optimizer: the training loop's (`compressor.training.loop.train`).
        temperature, alpha: the soft targets' (`compressor.training.teacher.kd_loss`).
        weight_qmax: the largest weight integer (127; 64 with 7-bit weights).
        learn_scales: train the activation scales (LSQ) until the last `FREEZE` of steps.

    Returns:
        The trained INT8 file, the FP32 file with the same trained weights (what an accuracy
        budget reverts nodes from), and a record: ``epochs``, ``lr``, ``optimizer``,
        ``train_loss``, ``torch_accuracy`` (the fake-quantized module's accuracy on the
        eval data, which the file's accuracy in ONNX Runtime should match), ``seconds``.
    """
    start = time.perf_counter()
    model, source = onnx.load(str(int8_path)), onnx.load(str(fp32_path))
    student = QDQModule(model, source, weight_qmax=weight_qmax, learn_scales=learn_scales)
    frozen_at = [0]

    def freeze_scales(step: int, total: int) -> None:
        if not student.frozen and step >= (1 - FREEZE) * total:
            student.freeze()
            frozen_at[0] = step

    record: dict[str, Any] = {}
    example = ctx.train_data.example_input()
    with teacher_loss(teacher, ctx, example, temperature=temperature, alpha=alpha) as loss:
        history = train(
            student,
            ctx,
            epochs=epochs,
            lr=lr,
            compute_loss=loss,
            desc=f"{ctx.step} (QAT)",
            after_step=freeze_scales,
            optimizer_kind=optimizer,
            record=record,
            single_process=True,
        )
    int8, fp32 = student.files(model, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    int8_out, fp32_out = out_dir / "model.qat.int8.onnx", out_dir / "model.qat.fp32.onnx"
    onnx.save(int8, str(int8_out))
    assert fp32 is not None
    onnx.save(fp32, str(fp32_out))

    def predict(inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return call(student, inputs)

    torch_accuracy = float(ctx.eval_fn(predict, ctx.eval_data))
    info = {
        "epochs": epochs,
        "lr": lr,
        **record,
        "learn_scales": learn_scales,
        "scales_frozen_at_step": frozen_at[0],
        "train_loss": [round(v, 6) for v in history],
        "torch_accuracy": round(torch_accuracy, 6),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return int8_out, fp32_out, info
