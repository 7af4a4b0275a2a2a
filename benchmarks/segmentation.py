"""Semantic segmentation end to end: a torchvision segmenter on Fashion-MNIST canvases.

The task is `compressor.segmentation_data.FashionCanvas` built from Debian's
dataset-fashion-mnist (the CLI's ``--data fashion-mnist-seg:DIR``): one to three items pasted
on a 64x64 canvas, 11 classes per pixel (background + the 10 item classes), 12,000 training
canvases from the training split and 2,000 test canvases from the test split.

The model (LR-ASPP on MobileNetV3-Large by default, random initial weights, 3 gray channels)
is trained once (cached), then compressed with sparsity training -> pruning -> pixel-wise
distillation -> INT8 at a short budget, three seeds. Every number comes from the pipeline's
own report (mIoU over the 2,000 test canvases; ONNX files run in ONNX Runtime), except the
peers' INT8 (ONNX Runtime's ``quantize_static`` with its defaults, and NNCF where installed)
of the same baseline file, measured with the same `cz.mean_iou` and the same side-by-side
batch-1 timing. Prints a table of means and spreads and writes
benchmarks/results/segmentation.json after every run.

    apt-get install dataset-fashion-mnist           # Debian: found in /usr/share/datasets
    python benchmarks/segmentation.py               # about 40 minutes on 2 cores
    python benchmarks/segmentation.py --seeds 0 --baseline-epochs 1 --train-batches 20
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
import dense_tasks

import compressor as cz
from compressor._io import atomic_path
from compressor.training import fit_baseline

MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def build(name: str, classes: int) -> torch.nn.Module:
    """A torchvision segmentation model with random weights, as ``--model torchvision:`` does."""
    builder = getattr(torchvision.models.segmentation, name)
    kwargs = {"aux_loss": False} if name.startswith(("fcn", "deeplab")) else {}
    return builder(weights=None, weights_backbone=None, num_classes=classes, **kwargs)


def baseline(
    name: str, train: Any, classes: int, epochs: int, cache: Path
) -> tuple[torch.nn.Module, cz.ModelIO]:
    """``name`` trained ``epochs`` on all training canvases (cached), and its IO."""
    torch.manual_seed(0)
    model = build(name, classes)
    io = cz.ModelIO(output="out", task="segmentation")
    path = cache / f"segmentation_{name}_e{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), io
    start = time.perf_counter()
    fit_baseline(model, train, epochs=epochs, lr=0.05, seed=0, loss_fn=io.loss_fn())
    print(f"{name}: baseline trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval(), io


if __name__ == "__main__":
    sys.exit(
        dense_tasks.main(
            __doc__.splitlines()[0],
            models=MODELS,
            task="segmentation",
            source="fashion-mnist-seg",
            metric="miou",
            label="mIoU",
            baseline=baseline,
            defaults={"input_size": 64, "baseline_epochs": 6},
        )
    )
