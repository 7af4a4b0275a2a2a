"""Compress right after training: the pipeline slots in at the end of your training script.

Everything above the "compress" comment is an ordinary PyTorch training script (its own
model, loop and optimiser, nothing from compressor). The pipeline then takes the trained
model and the same loaders, and writes model.int8.onnx and the report.

    python examples/train_then_compress.py             # the embedded demo data, ~3 min on 2 cores
    python examples/train_then_compress.py --quick     # a smoke run (the tests use it)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import compressor as cz
from compressor.sources.demo import demo_data


def build_model(num_classes: int = 10) -> nn.Module:
    """A plain CNN for 28x28 grayscale images: three conv-BN-ReLU blocks and a linear head."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(1, 32, 1),
        block(32, 64, 2),
        block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.numel()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", default="runs/train_then_compress")
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch")
    args = parser.parse_args()
    limit = 10 if args.quick else None

    # --- your training script -------------------------------------------------------
    torch.manual_seed(0)
    train_loader, val_loader = demo_data(batch_size=64)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        for step, (images, labels) in enumerate(train_loader):
            if limit is not None and step >= limit:
                break
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: val top-1 {evaluate(model, val_loader):.4f}")

    # --- compress: the trained model and the same loaders -----------------------------
    pipeline = cz.Pipeline(
        [
            cz.SparsityTraining(epochs=1, l1=1e-4),
            cz.StructuredPruning(ratio=0.5, round_to=8),
            cz.Distillation(epochs=2, temperature=4.0, alpha=0.7),
            cz.Int8Quantization(calibration_samples=512),
        ]
    )
    result = pipeline.run(
        model,
        train_loader,
        val_loader,
        output_dir=args.output,
        limit_train_batches=limit,
        progress=not args.quick,
    )
    print(result.report)
    print(f"deploy: {result.onnx_path}")
    # `model` is unchanged: training can go on from it, and result.model is the pruned,
    # distilled torch model (before INT8) should you want to fine-tune it further.


if __name__ == "__main__":
    main()
