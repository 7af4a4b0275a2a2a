"""Model factories as a user writes them, for the `--model` specs the CLI tests use."""

import torch
from torch import nn


class Net(nn.Module):
    """A small conv net with BatchNorm, global pooling and a linear head."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class FixedSizeNet(nn.Module):
    """Flatten -> Linear: runs only on 3x16x16 inputs."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class SpectralNet(Net):
    """Uses an FFT, which the ONNX exporter cannot export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.fft.fft2(x).abs())


class InterruptedNet(Net):
    """Stands in for a user pressing Ctrl-C: training it raises KeyboardInterrupt."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise KeyboardInterrupt
        return super().forward(x)


def build(num_classes: int = 4) -> nn.Module:
    return Net(num_classes)


def build_gray(num_classes: int = 10) -> nn.Module:
    return Net(num_classes, in_channels=1)


def fixed_size() -> nn.Module:
    return FixedSizeNet()


def spectral() -> nn.Module:
    return SpectralNet()


def interrupted(num_classes: int = 4) -> nn.Module:
    return InterruptedNet(num_classes)


def broken() -> nn.Module:
    raise ValueError("missing config 'depth'")


def not_a_model() -> int:
    return 42
