"""Semantic segmentation end to end: a torchvision segmenter on Fashion-MNIST canvases.

The task is `compressor.sources.segmentation_data.FashionCanvas` built from Debian's
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
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
import dense_tasks

import compressor as cz

MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def build(name: str, _batch: Any, classes: int) -> tuple[torch.nn.Module, cz.ModelIO]:
    """A torchvision segmentation model with random weights, as ``--model torchvision:``
    builds it, and its IO."""
    builder = getattr(torchvision.models.segmentation, name)
    kwargs = {"aux_loss": False} if name.startswith(("fcn", "deeplab")) else {}
    model = builder(weights=None, weights_backbone=None, num_classes=classes, **kwargs)
    return model, cz.ModelIO(output="out", task="segmentation")


if __name__ == "__main__":
    sys.exit(
        dense_tasks.main(
            __doc__.splitlines()[0],
            models=MODELS,
            task="segmentation",
            source="fashion-mnist-seg",
            metric="miou",
            label="mIoU",
            build=build,
            defaults={"input_size": 64, "baseline_epochs": 6},
        )
    )
