"""Object detection end to end: torchvision's SSDlite on Fashion-MNIST canvases.

The task is `compressor.detection_data.FashionDetection` built from Debian's
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
installed) of the same baseline file, scored with the same `compressor.detection.mean_ap`
and the same side-by-side batch-1 timing. Prints a table of means and spreads and writes
benchmarks/results/detection.json after every run.

    apt-get install dataset-fashion-mnist           # Debian: found in /usr/share/datasets
    python benchmarks/detection.py
    python benchmarks/detection.py --seeds 0 --baseline-epochs 1 --train-batches 20
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
from compressor.model_io import resolve_io
from compressor.training import fit_baseline

MODELS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16")


def build(name: str, classes: int) -> torch.nn.Module:
    """A torchvision detector with random weights, as ``--model torchvision:`` does."""
    builder = getattr(torchvision.models.detection, name)
    return builder(weights=None, weights_backbone=None, num_classes=classes)


def baseline(
    name: str, train: Any, classes: int, epochs: int, cache: Path
) -> tuple[torch.nn.Module, cz.ModelIO]:
    """``name``'s dense part trained ``epochs`` on all training canvases (cached), its IO."""
    torch.manual_seed(0)
    images, targets = next(iter(train))
    model, io = resolve_io(None, build(name, classes), images, targets)
    path = cache / f"detection_{name}_{images.shape[-1]}_e{epochs}.pt"
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
            task="detection",
            source="fashion-mnist-det",
            metric="map",
            label="mAP",
            baseline=baseline,
            defaults={"input_size": 160, "baseline_epochs": 8},
        )
    )
