"""The embedded demo: a small residual CNN and a Fashion-MNIST subset shipped in the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DEMO_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DemoResNet(nn.Module):
    """A ResNet-style CNN for 28x28 grayscale images: stem, three residual stages, linear head.

    At the default width (48) it has about 0.7M parameters and 84M MACs per image, enough
    that compute, not per-call overhead, dominates its latency, also after pruning half of
    its channels (which is why the demo recipe rounds widths to multiples of 8, not 16).
    """

    def __init__(self, num_classes: int = 10, width: int = 48, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        self.layer1 = _BasicBlock(w, w, 1)
        self.layer2 = _BasicBlock(w, 2 * w, 2)
        self.layer3 = _BasicBlock(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def demo_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (``train`` or ``val``) of the embedded Fashion-MNIST subset: ``(N, 28,
    28)`` uint8 images and ``(N,)`` int64 labels."""
    path = resources.files("compressor.sources") / "data" / "fashion_mnist_demo.npz"
    with resources.as_file(path) as file, np.load(Path(file)) as arrays:
        images = torch.from_numpy(arrays[f"{split}_images"])
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
    return images, labels


def demo_datasets() -> tuple[TensorDataset, TensorDataset]:
    """The embedded Fashion-MNIST subset (8,000 train / 2,000 val), normalised, 1x28x28."""

    def dataset(split: str) -> TensorDataset:
        raw, labels = demo_images(split)
        images = raw.float().div_(255).unsqueeze(1)
        images = (images - _MEAN) / _STD
        return TensorDataset(images, labels)

    return dataset("train"), dataset("val")


def demo_data(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the embedded Fashion-MNIST subset (8,000 / 2,000)."""
    train, val = demo_datasets()
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    return train_loader, DataLoader(val, batch_size=256)


DEMO_RECIPE = {
    "stages": [
        {"sparsity_training": {"epochs": 1, "l1": 1.0e-4, "lr": 0.01}},
        {"structured_pruning": {"ratio": 0.5, "round_to": 8}},
        {"distillation": {"epochs": 2, "temperature": 4.0, "alpha": 0.7, "lr": 0.01}},
        {"int8_quantization": {"calibration_samples": 512}},
    ]
}
