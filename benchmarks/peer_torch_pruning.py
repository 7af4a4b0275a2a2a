"""The peer row of compose.py: what a user writes by hand with torch-pruning, KD and ONNX
Runtime, on the same data and epochs as the library.

1. Sparsity: one epoch with Adam at 1e-3 and torch-pruning's own regulariser
   (`BNScalePruner.regularize`, network slimming, for a model with BatchNorm;
   `GroupNormPruner.regularize`, group lasso, without), as its README shows.
2. Pruning: the same pruner's `step()`, uniform ``ratio`` per layer, the output Linear kept.
3. Distillation: two epochs with Adam at 1e-3, ``0.7 * T^2 * KL(T=4) + 0.3 * CE`` against
   the original model.
4. INT8: `torch.onnx.export`, then ONNX Runtime's `quantize_static` (QDQ, its defaults),
   calibrated on 512 training images.

`run_peer` returns the accuracy after each step (the last in ONNX Runtime) and the MACs.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader


def accuracy(predict: Any, loader: DataLoader) -> float:
    correct = seen = 0
    for x, y in loader:
        out = predict(x)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    return correct / seen


def torch_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        return accuracy(model, loader)


def _pruner(model: nn.Module, example: torch.Tensor, ratio: float) -> tp.pruner.BasePruner:
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return tp.pruner.BNScalePruner(
            model,
            example,
            importance=tp.importance.BNScaleImportance(),
            pruning_ratio=ratio,
            ignored_layers=[head],
        )
    return tp.pruner.GroupNormPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[head],
    )


def run_peer(
    model: nn.Module,
    train: DataLoader,
    test: DataLoader,
    example: torch.Tensor,
    seed: int,
    ratio: float = 0.5,
    calibration: int = 512,
) -> dict[str, Any]:
    """The hand-written script on a copy of ``model``; its numbers (see the module doc)."""
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    base_macs, _ = tp.utils.count_ops_and_params(student, example)
    numbers: dict[str, Any] = {"baseline_top1": torch_accuracy(teacher, test)}

    pruner = _pruner(student, example, ratio)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    pruner.update_regularizer()
    for x, y in train:
        loss = F.cross_entropy(student(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize(student)
        optimizer.step()
    numbers["sparsity_top1"] = torch_accuracy(student, test)

    pruner.step()
    macs, _ = tp.utils.count_ops_and_params(student, example)
    numbers["pruned_top1"] = torch_accuracy(student, test)

    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(2):
        student.train()
        for x, y in train:
            with torch.no_grad():
                soft = teacher(x)
            out = student(x)
            kd = F.kl_div(F.log_softmax(out / 4, 1), F.softmax(soft / 4, 1), reduction="batchmean")
            loss = 0.7 * 16 * kd + 0.3 * F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    numbers["distilled_top1"] = torch_accuracy(student, test)

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            images = torch.cat([x for x, _ in train])[:calibration]
            self.batches = iter(images.split(32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "peer.onnx", Path(tmp) / "peer.int8.onnx"
        student.eval()
        torch.onnx.export(
            student,
            example,
            str(fp32),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

        numbers["final_top1"] = accuracy(predict, test)
        numbers["size_bytes"] = int8.stat().st_size
    numbers["macs"] = int(macs)
    numbers["macs_x"] = round(base_macs / macs, 2)
    numbers["drop_points"] = round(100 * (numbers["baseline_top1"] - numbers["final_top1"]), 2)
    numbers["sparsity_drop_points"] = round(
        100 * (numbers["baseline_top1"] - numbers["sparsity_top1"]), 2
    )
    numbers["pruning_drop_points"] = round(
        100 * (numbers["sparsity_top1"] - numbers["pruned_top1"]), 2
    )
    return numbers
