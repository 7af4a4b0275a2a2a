"""Do the stages compose, and how do they compare with a hand-written torch-pruning script?
Sparsity -> pruning -> distillation -> INT8 at a short budget.

Four small Fashion-MNIST models of this script's own, shaped as users write them: ``plain``
(no BatchNorm, flatten -> Linear), ``resbn`` (residual, BatchNorm), ``dwse`` (depthwise
inverted residuals with squeeze-excitation) and ``vggbn`` (VGG-style with BatchNorm, flatten
-> Linear -> Dropout -> Linear). Each is trained once on the 60,000 training images
(cached; with Adam at 1e-3, as a user's own script does, or the library's SGD with
``--baseline-optimizer sgd``), then compressed on a short budget: 20,000 training images,
other options at their defaults, three seeds per variant:

- ``sparsity``: the library's defaults with only epochs and ratio set: sparsity training 1
  epoch -> pruning -> distillation 2 epochs -> INT8
- ``no_sparsity``: the ablation, the same 3 epochs all spent on distillation
- ``l1_uniform``: the older defaults: uniform L1 on all channel scales, the same share pruned
  from every layer
- ``peer``: the hand-written torch-pruning + KD + ONNX Runtime script
  (`peer_torch_pruning.py`), uniform pruning at ``--ratio``

``--at peer`` prunes the library's variants to the MACs the peer kept (``target_macs``), for
a comparison at equal compression; ``--set STAGE.OPTION=VALUE`` and ``--label`` run ablations.
Every library number comes from the pipeline's own report (accuracy over the 10,000 test
images, each ONNX file run in ONNX Runtime). Prints a table of means and standard
deviations over the seeds and writes the JSON after every run.

    apt-get install dataset-fashion-mnist        # Debian: found in /usr/share/datasets
    python benchmarks/compose.py --models plain resbn --variants peer sparsity --at peer
    python benchmarks/compose.py --models resbn --variants sparsity --seeds 0 \
        --set sparsity_training.alpha=0.7 --label _kd --at peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import TABLE_RUN, print_table, side_by_side, write_results
from fashion_mnist import prepare_debian
from peer_torch_pruning import run_peer

import compressor as cz
from compressor._io import atomic_path, write_text
from compressor.runtime.measure import ort_predictor, ort_session
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent
MEAN, STD = 0.2860, 0.3530


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ResBNNet(nn.Module):
    """Residual BatchNorm network: 32 -> 64 -> 128 channels (``widths``), a residual block
    at each width."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        a, b, c = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU()
        )
        self.body = nn.Sequential(ResBlock(a), down(a, b), ResBlock(b), down(b, c), ResBlock(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


class PlainNet(nn.Module):
    """Plain conv network without BatchNorm, ending in flatten -> Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, 3x3 depthwise, squeeze-excitation, 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
        )
        squeeze = max(8, mid // 4)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(mid, squeeze, 1),
            nn.ReLU(),
            nn.Conv2d(squeeze, mid, 1),
            nn.Hardsigmoid(),
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise(self.expand(x))
        out = self.project(out * self.se(out))
        return x + out if self.residual else out


class DWSENet(nn.Module):
    """Depthwise inverted residuals with squeeze-excitation (MobileNetV2/V3-like), 16 -> 64."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 48, 2),
            InvertedResidual(48, 48, 1),
            InvertedResidual(48, 64, 1),
        )
        self.head = nn.Sequential(
            nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6()
        )
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


class VGGBNNet(nn.Module):
    """VGG-style BatchNorm network: conv-BN-ReLU pairs, max pooling, then flatten ->
    Linear -> Dropout -> Linear."""

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),
            *conv(64, 128), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# model, baseline SGD lr (with --baseline-optimizer sgd; Adam trains at 1e-3, as users do)
MODELS = {
    "resbn": (ResBNNet, 0.05),
    "plain": (PlainNet, 0.02),
    "dwse": (DWSENet, 0.05),
    "vggbn": (VGGBNNet, 0.05),
}


def variant(name: str, ratio: float, target_macs: int | None = None) -> list[cz.Stage]:
    """The stages of one library variant at the short budget (3 training epochs in all);
    pruned to ``target_macs`` instead of ``ratio`` when given."""
    prune = {"target_macs": target_macs} if target_macs is not None else {"ratio": ratio}
    if name == "sparsity":
        return [
            cz.SparsityTraining(epochs=1),
            cz.StructuredPruning(**prune),
            cz.Distillation(epochs=2),
            cz.Int8Quantization(),
        ]
    if name == "no_sparsity":
        return [cz.StructuredPruning(**prune), cz.Distillation(epochs=3), cz.Int8Quantization()]
    if name == "l1_uniform":
        return [
            cz.SparsityTraining(epochs=1, method="l1"),
            cz.StructuredPruning(**prune, global_pruning=False),
            cz.Distillation(epochs=2),
            cz.Int8Quantization(),
        ]
    raise ValueError(name)


VARIANTS = ("sparsity", "no_sparsity", "l1_uniform", "peer")


def with_overrides(stages: list[cz.Stage], overrides: list[str]) -> list[cz.Stage]:
    """``stages`` with ``STAGE.OPTION=VALUE`` overrides (the CLI's ``--set``), for ablations."""
    import yaml

    from compressor.pipeline.recipe import override_recipe

    recipe = cz.Pipeline(stages).to_recipe()
    for item in overrides:
        key, _, text = item.partition("=")
        if key.split(".")[0] in {s.name for s in stages}:
            recipe = override_recipe(recipe, key, yaml.safe_load(text))
    return cz.Pipeline.from_recipe(recipe).stages


def tensors(root: Path) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST train and test sets as normalised tensors (torchvision reads the files)."""
    from torchvision.datasets import FashionMNIST

    sets = []
    for train in (True, False):
        raw = FashionMNIST(str(root), train=train, download=False)
        images = (raw.data.float().div(255).sub(MEAN).div(STD)).unsqueeze(1)
        sets.append(TensorDataset(images, raw.targets.long()))
    return sets[0], sets[1]


def baseline(
    name: str, train: TensorDataset, epochs: int, cache: Path, optimizer: str = "adam"
) -> nn.Module:
    """The model ``name`` trained on all training images; cached. ``adam``: Adam at 1e-3,
    constant, as a user's own script trains; ``sgd``: the library's `fit_baseline`."""
    cls, lr = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    tag = "" if optimizer == "sgd" else f"_{optimizer}"
    path = cache / f"compose_{name}_e{epochs}_n{len(train)}{tag}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    loader = DataLoader(train, batch_size=128, shuffle=True)
    if optimizer == "sgd":
        fit_baseline(model, loader, epochs=epochs, lr=lr, seed=0)
    else:
        fit_adam(model, loader, epochs)
    print(f"{name}: baseline trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def fit_adam(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-3) -> None:
    """A user's training loop: Adam at a constant ``lr``, cross-entropy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def run_one(
    model: nn.Module,
    stages: list[cz.Stage],
    train: Any,
    test: Any,
    seed: int,
    out: Path,
    device: str | None = None,
) -> dict[str, Any]:
    """One pipeline run; the numbers the table needs, from its report."""
    start = time.perf_counter()
    result = cz.Pipeline(stages).run(
        model,
        train,
        test,
        output_dir=out,
        seed=seed,
        device=device,
        **TABLE_RUN,
    )
    seconds = time.perf_counter() - start
    rows = {(r.name, r.runtime): r for r in result.report.rows}
    base = rows[("baseline", "onnxruntime")]
    final = result.report.rows[-1]
    sparse = rows.get(("sparsity_training", "torch"))
    pruned = rows[("structured_pruning", "torch")]
    summary = result.report.summary
    return {
        "baseline_top1": base.accuracy,
        "sparsity_top1": sparse.accuracy if sparse else None,
        "pruned_top1": pruned.accuracy,
        "distilled_top1": rows[("distillation", "torch")].accuracy,
        "final_top1": final.accuracy,
        "drop_points": round(100 * (base.accuracy - final.accuracy), 2),
        "sparsity_drop_points": round(100 * (base.accuracy - sparse.accuracy), 2)
        if sparse
        else None,
        "pruning_drop_points": round(100 * (sparse.accuracy - pruned.accuracy), 2)
        if sparse
        else None,
        "removed_at_zero": pruned.details["pruning"].get("removed_at_zero_fraction"),
        "macs": final.macs,
        "macs_x": round(base.macs / final.macs, 2),
        "size_x": summary.get("size_ratio"),
        "speedup_vs_onnx": summary.get("speedup_vs_onnx"),
        "seconds": round(seconds, 1),
    }


def latency(out: Path, example: torch.Tensor) -> dict[str, Any]:
    """Batch-1 p50 of the run's FP32 baseline file and its INT8 artifact, side by side.

    Interleaved rounds, so a busy spell of the machine falls on both files alike.
    """
    predict = {
        name: ort_predictor(ort_session(out / name, 2))
        for name in ("model.onnx", "model.int8.onnx")
    }
    timings = side_by_side({n: (lambda p=p: p(example)) for n, p in predict.items()})
    fp32, int8 = timings["model.onnx"]["p50"], timings["model.int8.onnx"]["p50"]
    return {"fp32_p50_ms": fp32, "int8_p50_ms": int8, "speedup_bs1": round(fp32 / int8, 2)}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, variant): mean and standard deviation over the seeds."""
    keys = sorted({(r["model"], r["variant"], r.get("at", "ratio")) for r in runs})
    rows = []
    for model, name, at in keys:
        group = [
            r for r in runs if (r["model"], r["variant"], r.get("at", "ratio")) == (model, name, at)
        ]
        row: dict[str, Any] = {"model": model, "variant": name, "at": at, "seeds": len(group)}
        keys = (
            "drop_points",
            "sparsity_drop_points",
            "pruning_drop_points",
            "macs_x",
            "size_x",
            "speedup_bs1",
        )
        for key in keys:
            values = [r[key] for r in group if r.get(key) is not None]
            if not values:
                continue
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[key] = f"{mean:.2f} ± {spread:.2f}"
        row["final_top1"] = round(statistics.fmean(r["final_top1"] for r in group), 4)
        row["baseline_top1"] = group[0]["baseline_top1"]
        rows.append(row)
    return rows


def save(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    """Write the table rows and every run to ``args.out`` (atomically)."""
    settings = {
        "train_images": args.train_images,
        "ratio": args.ratio,
        "baseline_epochs": args.baseline_epochs,
        "baseline_optimizer": args.baseline_optimizer,
        "threads": 2,
    }
    write_results(args.out, settings, aggregate(runs))
    data = json.loads(args.out.read_text())
    data["runs"] = runs
    write_text(args.out, json.dumps(data, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument(
        "--at",
        choices=("ratio", "peer"),
        default="ratio",
        help="prune the library's variants at --ratio, or to the MACs the peer script kept",
    )
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("--baseline-optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--baseline-images", type=int, default=None, help="default: all")
    parser.add_argument("--test-images", type=int, default=None, help="default: all")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.OPTION=VALUE",
        help="override a stage option of the library's variants (ablations)",
    )
    parser.add_argument("--label", default="", help="appended to the variant's name in results")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--device", default="cpu", help="where training runs (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compose.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    prepare_debian(args.data)
    train_set, test_set = tensors(args.data)
    subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    short = torch.utils.data.Subset(train_set, subset[: args.train_images].tolist())
    if args.test_images:
        test_set = torch.utils.data.Subset(test_set, range(args.test_images))
    test = DataLoader(test_set, batch_size=256)
    fit_set = train_set
    if args.baseline_images:
        fit_set = torch.utils.data.Subset(train_set, subset[: args.baseline_images].tolist())
    example = next(iter(test))[0][:1]
    runs: list[dict[str, Any]] = []
    names = {v if v == "peer" else v + args.label for v in args.variants}
    at = "ratio" if args.at == "ratio" else "peer_macs"
    if args.out.is_file():  # keep the runs of other models and variants
        runs = [
            r
            for r in json.loads(args.out.read_text()).get("runs", [])
            if (r["model"], r["variant"], r["seed"], r.get("at", "ratio"))
            not in {
                (m, v, seed, "ratio" if v == "peer" else at)
                for m in args.models
                for v in names
                for seed in args.seeds
            }
        ]
    for name in args.models:
        model = baseline(name, fit_set, args.baseline_epochs, args.cache, args.baseline_optimizer)
        for seed in args.seeds:
            peer = next(
                (r for r in runs if (r["model"], r["variant"], r["seed"]) == (name, "peer", seed)),
                None,
            )
            kinds = list(args.variants)
            if args.at == "peer" and peer is None and "peer" not in kinds:
                kinds.insert(0, "peer")
            for kind in sorted(kinds, key=lambda k: k != "peer"):  # the peer first
                torch.manual_seed(seed)
                train = DataLoader(short, batch_size=64, shuffle=True)  # seeded by the run
                if kind == "peer":
                    found = run_peer(model, train, test, example, seed, ratio=args.ratio)
                    runs.append({"model": name, "variant": "peer", "seed": seed, **found})
                    peer = runs[-1]
                else:
                    target = peer["macs"] if args.at == "peer" and peer else None
                    stages = with_overrides(variant(kind, args.ratio, target), args.set)
                    out = args.cache / "compose" / f"{name}_{kind}{args.label}_{at}_{seed}"
                    found = run_one(model, stages, train, test, seed, out, args.device)
                    found.update(latency(out, example))
                    variant_name = kind + args.label
                    runs.append(
                        {"model": name, "variant": variant_name, "seed": seed, "at": at, **found}
                    )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                save(args, runs)
    save(args, runs)
    print_table(
        aggregate(runs),
        [
            ("model", "model"),
            ("variant", "variant"),
            ("pruned at", "at"),
            ("seeds", "seeds"),
            ("baseline top-1", "baseline_top1"),
            ("final INT8 top-1 (mean)", "final_top1"),
            ("drop, points", "drop_points"),
            ("sparsity stage, points", "sparsity_drop_points"),
            ("drop at pruning, points", "pruning_drop_points"),
            ("MACs x", "macs_x"),
            ("size x", "size_x"),
            ("speedup vs ORT FP32, bs 1", "speedup_bs1"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
