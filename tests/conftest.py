"""Tiny models and synthetic data: real torch-pruning and ONNX Runtime, in seconds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on two cores: torch's default of one thread per core in each worker
    # oversubscribes them, and its spinning OpenMP threads then wait on each other (the
    # same zoo tests took 108 s with it, 42 s with one thread each). Measurements still
    # use the threads they are given. Child processes (the CLI, torchrun) inherit this.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _spread_bn_scales(model: nn.Module) -> None:
    # Fresh BatchNorms all have gamma = 1, a tie no trained model has; spread them out.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 1.0)


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (add), linear head: BN gammas to slim."""

    def __init__(self, num_classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        _spread_bn_scales(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(self.down(x)), 1))


class TinyConcatNet(nn.Module):
    """Concatenation of two branches and a depthwise conv."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.pw = nn.Sequential(nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)
        _spread_bn_scales(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(x.mean(dim=(2, 3)))


class TinyNoBNNet(nn.Module):
    """No BatchNorm; conv -> flatten -> Linear head (the flatten couples channels to features)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def write_image_folder(root: Path, size: int = 20, train: int = 12, val: int = 4) -> Path:
    """imagefolder layout under ``root``: train/ and val/, 4 classes of coloured PNG images."""
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (200, 200, 40)]
    g = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for index, color in enumerate(colors):
            folder = root / split / f"class_{index}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(g.normal(color, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def synthetic_classification(
    n: int = 256, num_classes: int = 4, seed: int = 0, size: int = 16
) -> TensorDataset:
    """Images whose class sets a per-channel mean and a spatial pattern: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    means = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123))
    patterns = torch.randn(num_classes, 1, size, size, generator=torch.Generator().manual_seed(7))
    images = (
        torch.randn(n, 3, size, size, generator=g) + 0.8 * means[labels] + 0.8 * patterns[labels]
    )
    return TensorDataset(images, labels)


def loaders(
    n_train: int = 256, n_val: int = 128, batch_size: int = 32
) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(
        synthetic_classification(n_train, seed=0),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(synthetic_classification(n_val, seed=1), batch_size=batch_size)
    return train, val


def fit(model: nn.Module, train: DataLoader, epochs: int = 3) -> nn.Module:
    """Quickly train a tiny model so accuracy means something."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def data() -> tuple[DataLoader, DataLoader]:
    return loaders()


@pytest.fixture(scope="session")
def trained_resnet(data: tuple[DataLoader, DataLoader]) -> TinyResNet:
    torch.manual_seed(0)
    return fit(TinyResNet(), data[0])


@pytest.fixture(scope="session")
def trained_nobn(data: tuple[DataLoader, DataLoader]) -> TinyNoBNNet:
    torch.manual_seed(0)
    return fit(TinyNoBNNet(), data[0])


@pytest.fixture
def example() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16)


def two_input_model(path: Path, batch: int | str = "N", width: int = 4, layers: int = 1):
    """y = relu(x @ W)... @ W + sum(ids): a float and an int64 input, as text models have."""
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"h{i}"]),
        ]
        last = f"h{i}"
    nodes += [
        helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idf", "axis"], ["s"], keepdims=1),
        helper.make_node("Add", [last, "s"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def network_namespace() -> list[str]:
    """``unshare --net`` (as root), else with a user namespace mapping this user to root."""
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
        except FileNotFoundError:
            break
    pytest.fail("the Ray tests run in a network namespace: util-linux's unshare --net is needed")
