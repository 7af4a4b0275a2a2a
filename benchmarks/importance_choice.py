"""Which channel ranking to prune by at a MACs target: ``bn_scale``, ``lamp``, and ``auto``.

Each model is trained once (cached), then pruned to ``--macs-fraction`` of its MACs with
each importance (the stage alone, applied directly: no export or timing) and nothing
trained after: BatchNorms re-estimated on 32 training batches, the task's metric on the
test data. This isolates what the ranking alone costs, which is what
``importance: auto`` compares at a target (on up to 256 eval inputs) before it picks one;
the ``auto`` row shows its pick. Pruning is deterministic for a given trained model, so a
row is one number, not a mean over seeds.

Models: ``demo`` (the demo's ResNet, 3 epochs on the embedded Fashion-MNIST subset),
``segmentation`` and ``detection`` (the baselines of segmentation.py and detection.py,
trained by them or here, cached in the same files).

    python benchmarks/importance_choice.py --models demo segmentation detection
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dense_tasks
import detection
import segmentation
from common import print_table, write_results
from fashion_mnist import prepare_debian

import compressor as cz
from compressor._io import atomic_path
from compressor.data import DataSpec
from compressor.runtime.measure import count_params_macs, torch_predictor
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.demo import DemoResNet, demo_data
from compressor.stage import RunContext, State
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent
IMPORTANCES = ("bn_scale", "lamp", "auto")


def demo_model(
    cache: Path, epochs: int, images: int | None
) -> tuple[torch.nn.Module, cz.ModelIO | None, Any, Any]:
    """The demo's ResNet trained ``epochs`` (cached), and its data (the first ``images``
    of each split when given)."""
    train, val = demo_data()
    if images:
        train, val = (
            torch.utils.data.DataLoader(
                torch.utils.data.Subset(loader.dataset, range(images)), batch_size=64
            )
            for loader in (train, val)
        )
    torch.manual_seed(0)
    model = DemoResNet()
    path = cache / f"importance_demo_e{epochs}_{images or 'all'}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit_baseline(model, train, epochs=epochs, lr=0.05, seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return model.eval(), cz.ModelIO(task="classification"), train, val


def dense_model(task: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Any, Any]:
    """The segmentation or detection benchmark's baseline (cached), and a test subset."""
    module, size, epochs = {
        "segmentation": (segmentation, 64, 6),
        "detection": (detection, 96, 4),
    }[task]
    name = module.MODELS[0]
    prepare_debian(args.data)
    options = DataOptions(input_size=size, channels=3, batch_size=32)
    source = {"segmentation": "fashion-mnist-seg", "detection": "fashion-mnist-det"}[task]
    train, test, info = load_data(f"{source}:{args.data}", options)
    subset = torch.utils.data.Subset(test.dataset, range(args.test_images))
    test = torch.utils.data.DataLoader(subset, batch_size=32, collate_fn=test.collate_fn)
    path = args.cache / f"{task}_{name}_{size}_e{epochs}.pt"
    model, io = dense_tasks.baseline(module.build, name, train, info.num_classes, epochs, path)
    return model, io, train, test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=("demo", "segmentation", "detection"), default=["demo"]
    )
    parser.add_argument("--macs-fraction", type=float, default=0.5)
    parser.add_argument("--importances", nargs="+", choices=IMPORTANCES, default=IMPORTANCES)
    parser.add_argument("--demo-epochs", type=int, default=3)
    parser.add_argument("--demo-images", type=int, default=None, help="default: all")
    parser.add_argument("--test-images", type=int, default=500, help="segmentation, detection")
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "importance_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows: list[dict[str, Any]] = []
    for name in args.models:
        if name == "demo":
            model, io, train, test = demo_model(args.cache, args.demo_epochs, args.demo_images)
        else:
            model, io, train, test = dense_model(name, args)
        example = next(iter(test))[0][:1]
        macs = count_params_macs(model, example)[1]
        ctx = RunContext(
            train_data=DataSpec(train),
            eval_data=DataSpec(test),
            output_dir=args.cache,
            loss_fn=io.loss_fn(),
            eval_fn=io.eval_fn(),
            device=torch.device("cpu"),
            threads=2,
            progress=False,
            io=io,
            step="structured_pruning",
        )
        with torch.no_grad():
            baseline = ctx.eval_fn(torch_predictor(model), ctx.eval_data)
        for importance in args.importances:
            stage = cz.StructuredPruning(
                target_macs=macs * args.macs_fraction,
                importance=importance,
                round_to=8 if name == "demo" else 16,
            )
            start = time.perf_counter()
            state = stage.apply(State(model, model, example), ctx)
            pruning = state.details["pruning"]
            with torch.no_grad():
                pruned = ctx.eval_fn(torch_predictor(state.model), ctx.eval_data)
            rows.append(
                {
                    "model": name,
                    "metric": io.metric,
                    "importance": importance,
                    "chosen": pruning["importance"],
                    "ratio": round(pruning["ratio"], 4),
                    "baseline": round(baseline, 4),
                    "pruned": round(pruned, 4),
                    "macs_x": round(macs / count_params_macs(state.model, example)[1], 2),
                    "trials": (pruning["target"].get("importance") or {}).get("trials"),
                    "samples": (pruning["target"].get("importance") or {}).get("samples"),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
            settings = {"macs_fraction": args.macs_fraction, "demo_epochs": args.demo_epochs}
            write_results(args.out, {**settings, "threads": 2}, rows)
    print_table(
        rows,
        [
            ("model", "model"),
            ("metric", "metric"),
            ("importance", "importance"),
            ("ranked by", "chosen"),
            ("ratio", "ratio"),
            ("MACs x", "macs_x"),
            ("baseline", "baseline"),
            ("pruned, before training", "pruned"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
