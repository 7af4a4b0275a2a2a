"""Object detection end to end: torchvision's SSDlite on Fashion-MNIST canvases.

The task is `compressor.sources.detection_data.FashionDetection` built from Debian's
dataset-fashion-mnist (the CLI's ``--data fashion-mnist-det:DIR``): one to four items, each
scaled to 28-56 pixels, on a black canvas (160x160 by default), one box per item, 10 classes
plus the background; 12,000 training canvases from the training split and 2,000 test
canvases from the test split.

The model (SSDlite320 on MobileNetV3-Large, random initial weights) is trained once as its
dense part (cached), then compressed with sparsity training -> pruning -> distillation ->
INT8 (the heads' last layers in FP32) at a short budget, three seeds. Every number comes
from the pipeline's own report (COCO mAP by pycocotools over the test canvases, boxes
decoded in FP32 after the ONNX file; files run in ONNX Runtime), except the peers' INT8
(ONNX Runtime's ``quantize_static`` with its defaults, every layer INT8, and NNCF where
installed) of the same baseline file, scored with the same `compressor.models.detection.mean_ap`
and the same side-by-side batch-1 timing. Prints a table of means and spreads and writes
benchmarks/results/detection.json after every run.

    apt-get install dataset-fashion-mnist           # Debian: found in /usr/share/datasets
    python benchmarks/detection.py
    python benchmarks/detection.py --seeds 0 --baseline-epochs 1 --train-batches 20
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
from compressor.models.model_io import resolve_io

MODELS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16")


def build(name: str, batch: Any, classes: int) -> tuple[torch.nn.Module, cz.ModelIO]:
    """A torchvision detector with random weights, as ``--model torchvision:`` builds it,
    taken apart into its dense part for ``batch``'s image size, and its IO."""
    builder = getattr(torchvision.models.detection, name)
    detector = builder(weights=None, weights_backbone=None, num_classes=classes)
    return resolve_io(None, detector, *batch)


if __name__ == "__main__":
    sys.exit(
        dense_tasks.main(
            __doc__.splitlines()[0],
            models=MODELS,
            task="detection",
            source="fashion-mnist-det",
            metric="map",
            label="mAP",
            build=build,
            defaults={"input_size": 160, "baseline_epochs": 8},
        )
    )
