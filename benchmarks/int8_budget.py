"""An accuracy budget for INT8: how many nodes go back to FP32 to keep a model within it.

A small convolutional network (no BatchNorm) is trained on Fashion-MNIST, once per seed.
Then the busiest channel of its first conv's output is scaled up until its peak is
``--outlier`` (100) times the whole activation's peak before, and the next conv's weights on
that channel down by the same factor: the same function in FP32 (ReLU commutes with a
positive scale), but 8 bits for that activation now span the outlier channel and leave the
others a hundredth of their resolution: a layer that quantizes badly, as outlier channels
do in real models. The INT8 stage runs with
``max_accuracy_drop`` (default 0.005) on the model with and without the outlier.

Every number comes from the pipeline's report (accuracy over the 10,000 test images, each
ONNX file run in ONNX Runtime). Prints one row per model and seed, then the means and
standard deviations, and writes benchmarks/results/int8_budget.json.

    apt-get install dataset-fashion-mnist        # Debian: found in /usr/share/datasets
    python benchmarks/int8_budget.py             # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))
from common import TABLE_RUN, print_table, write_results
from compose import tensors
from fashion_mnist import prepare_debian

import compressor as cz

HERE = Path(__file__).parent


class PlainNet(nn.Module):
    """Four 3x3 convs with ReLU (two of stride 2), global average pool, linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv0, self.conv1, self.conv2, self.conv3):
            x = torch.relu(conv(x))
        return self.fc(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def add_outlier(self, factor: float, x: torch.Tensor) -> None:
        """Scale conv0's busiest output channel on ``x`` until its peak is ``factor`` times
        the peak of the whole activation before (the same function in FP32)."""
        act = torch.relu(self.conv0(x))
        peaks = act.amax(dim=(0, 2, 3))
        channel = int(act.mean(dim=(0, 2, 3)).argmax())
        scale = factor * float(peaks.max()) / float(peaks[channel])
        self.conv0.weight[channel] *= scale
        self.conv0.bias[channel] *= scale
        self.conv1.weight[:, channel] /= scale


def train_adam(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    """Adam with cross-entropy: a plain ReLU network without BatchNorm trains with it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def run(model: nn.Module, train: Any, test: Any, budget: float, threads: int) -> dict[str, Any]:
    stage = cz.Int8Quantization(fp32_placement=False, qat="never")  # FP32 fallback alone
    with tempfile.TemporaryDirectory() as out:
        result = cz.Pipeline([stage], max_accuracy_drop=budget).run(
            model,
            train,
            test,
            output_dir=out,
            **{**TABLE_RUN, "threads": threads},
        )
    row = result.report.row("int8_quantization", "onnxruntime")
    info = row.details["quantization"]["accuracy_budget"]
    base = result.report.row("baseline", "onnxruntime")
    return {
        "fp32": info["fp32_accuracy"],
        "int8": info["int8_accuracy"],
        "final": row.accuracy,
        "drop_points": round((result.report.rows[0].accuracy - row.accuracy) * 100, 2),
        "met": result.budget_met,
        "fp32_nodes": len(info["fp32_nodes"]),
        "fp32_producers": len(info.get("fp32_producers", [])),
        "nodes": len(info.get("sensitivity", {}).get("nodes", [])) or None,
        "budget_s": info["seconds"],
        "fp32_p50_ms": base.latency_ms["p50"],
        "int8_p50_ms": row.latency_ms["p50"],
        "reverted": info["fp32_nodes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--outlier", type=float, default=100.0)
    parser.add_argument("--train-images", type=int, default=None, help="default: all")
    parser.add_argument("--test-images", type=int, default=None, help="default: all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8_budget.json")
    args = parser.parse_args()
    prepare_debian(args.data)
    train_set, test_set = tensors(args.data)
    if args.train_images:
        train_set = Subset(train_set, range(args.train_images))
    if args.test_images:
        test_set = Subset(test_set, range(args.test_images))
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = PlainNet()
        loader = DataLoader(train_set, batch_size=128, shuffle=True)
        start = time.perf_counter()
        train_adam(model, loader, args.epochs, args.lr)
        print(f"seed {seed}: trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        train = DataLoader(train_set, batch_size=128, shuffle=False)
        test = DataLoader(test_set, batch_size=256)
        for name in ("plain", "outlier"):
            if name == "outlier":
                model.add_outlier(args.outlier, next(iter(train))[0])
            rows.append({"model": name, "seed": seed, **run(model, train, test, args.budget, 2)})
            print_table(rows[-1:], COLUMNS)
    summary = []
    for name in ("plain", "outlier"):
        mine = [r for r in rows if r["model"] == name]
        entry: dict[str, Any] = {"model": name, "seed": "mean (sd)"}
        for key in ("fp32", "int8", "final", "drop_points", "fp32_nodes", "budget_s"):
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[key] = f"{statistics.mean(values):.4g} ({spread:.2g})"
        entry["met"] = f"{sum(bool(r['met']) for r in mine)}/{len(mine)}"
        entry["nodes"] = mine[0]["nodes"]
        summary.append(entry)
    print()
    print_table(rows + summary, COLUMNS)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out, settings, rows)
    return 0


COLUMNS = [
    ("model", "model"),
    ("seed", "seed"),
    ("FP32 acc", "fp32"),
    ("INT8 acc", "int8"),
    ("after budget", "final"),
    ("drop (points)", "drop_points"),
    ("met", "met"),
    ("nodes in FP32", "fp32_nodes"),
    ("+ producers", "fp32_producers"),
    ("of nodes ranked", "nodes"),
    ("budget s", "budget_s"),
]

if __name__ == "__main__":
    sys.exit(main())
