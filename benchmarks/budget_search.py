"""An accuracy budget that searches the pruning ratio, against the ``balanced`` preset.

Two small Fashion-MNIST models of this project's own: `PlainNet` (convs without BatchNorm,
flatten -> Linear; from compose.py) and ``smallres``, compose.py's residual BatchNorm network
at 16 -> 32 -> 64 channels. Each is trained once on the 60,000 training images (cached), then
compressed on ``--train-images`` of them, three seeds, three ways:

- ``balanced``: the ``balanced`` preset as shipped (sparsity training 2 epochs, pruning
  0.5, distillation 3 epochs, INT8);
- ``search``: the same recipe with ``max_accuracy_drop`` (0.005) and ``max_search_minutes``:
  the pipeline searches the pruning ratio from 0.5 for the most pruned model within the
  budget;
- ``harsh``: pruning 0.8 and distillation 1 epoch with the same budget and no search, which
  should end over budget, with ``model.int8.over-budget.onnx`` and the message the CLI prints.

Every number comes from the pipeline's own report (accuracy over the 10,000 test images, or
the first ``--test-images``; the INT8 file run in ONNX Runtime). Prints a row per run and a
table of means and standard deviations, and writes benchmarks/results/budget_search.json
after every run.

    apt-get install dataset-fashion-mnist        # Debian: found in /usr/share/datasets
    python benchmarks/budget_search.py           # about 50 minutes on 2 cores
    python benchmarks/budget_search.py --models plain --seeds 0 --minutes 3
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
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import TABLE_RUN, print_table, write_results
from compose import PlainNet, ResBNNet, tensors
from fashion_mnist import prepare_debian

import compressor as cz
from compressor._io import atomic_path
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent


def small_resnet() -> nn.Module:
    """compose.py's residual BatchNorm network at 16 -> 32 -> 64 channels."""
    return ResBNNet((16, 32, 64))


MODELS = {"plain": (PlainNet, 0.02), "smallres": (small_resnet, 0.05)}  # model, baseline lr
WAYS = ("balanced", "search", "harsh")


def baseline(name: str, train: TensorDataset, epochs: int, cache: Path) -> nn.Module:
    """The model ``name`` trained on all training images; cached."""
    cls, lr = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    path = cache / f"budget_{name}_e{epochs}_n{len(train)}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    fit_baseline(model, DataLoader(train, batch_size=128, shuffle=True), epochs=epochs, lr=lr)
    print(f"{name}: baseline trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def pipeline(way: str, budget: float, minutes: float) -> cz.Pipeline:
    """The pipeline of one way (see the module docstring)."""
    if way == "harsh":
        stages = [
            cz.StructuredPruning(ratio=0.8),
            cz.Distillation(epochs=1),
            cz.Int8Quantization(),
        ]
        return cz.Pipeline(stages, max_accuracy_drop=budget)
    if way == "search":
        recipe = {
            **cz.Pipeline.from_recipe("balanced").to_recipe(),
            "max_accuracy_drop": budget,
            "max_search_minutes": minutes,
        }
        return cz.Pipeline.from_recipe(recipe)
    return cz.Pipeline.from_recipe("balanced")


def run_one(model: nn.Module, way: str, args: argparse.Namespace, data: Any, seed: int) -> dict:
    """One pipeline run; the numbers the table needs, from its report."""
    out = args.cache / "budget_search" / f"{way}_{seed}"
    start = time.perf_counter()
    result = pipeline(way, args.budget, args.minutes).run(
        model,
        *data,
        output_dir=out,
        seed=seed,
        resume=False,
        **TABLE_RUN,
    )
    seconds = time.perf_counter() - start
    report = result.report
    base = report.rows[0]  # torch FP32: what the budget is measured against
    final = report.rows[-1]
    pruning = report.row("structured_pruning").details["pruning"]
    search = pruning.get("search") or {}
    drop = base.accuracy - final.accuracy
    return {
        "baseline_top1": base.accuracy,
        "final_top1": final.accuracy,
        "drop_points": round(100 * drop, 2),
        "within_budget": drop <= args.budget + 1e-9,
        "budget_met": result.budget_met,
        "ratio": search.get("ratio", pruning.get("ratio")),
        "macs_x": round(base.macs / final.macs, 2),
        "artifact": result.onnx_path.name if result.onnx_path else None,
        "candidates": len(search.get("trace", [])) or None,
        "stopped": search.get("stopped"),
        "trace": search.get("trace"),
        "message": report.budget_line(),
        "seconds": round(seconds, 1),
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± standard deviation per model and way."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        for way in WAYS:
            group = [r for r in runs if r["model"] == name and r["way"] == way]
            if not group:
                continue
            row: dict[str, Any] = {"model": name, "way": way, "seeds": len(group)}
            for key in ("drop_points", "macs_x", "ratio", "seconds"):
                values = [r[key] for r in group if r[key] is not None]
                if values:
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    row[key] = f"{statistics.mean(values):.2f} ± {spread:.2f}"
            row["within"] = f"{sum(r['within_budget'] for r in group)}/{len(group)}"
            row["artifacts"] = ", ".join(sorted({str(r["artifact"]) for r in group}))
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=4_000)
    parser.add_argument("--test-images", type=int, default=10_000, help="of the 10,000")
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--minutes", type=float, default=5.0, help="max_search_minutes")
    parser.add_argument("--baseline-epochs", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "budget_search.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    prepare_debian(args.data)
    train_set, test_set = tensors(args.data)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    short = Subset(train_set, order[: args.train_images].tolist())
    test = DataLoader(Subset(test_set, range(min(args.test_images, len(test_set)))), batch_size=256)
    runs: list[dict[str, Any]] = []
    if args.out.is_file():  # keep the runs of other models, ways and seeds
        done = {(m, w, s) for m in args.models for w in args.ways for s in args.seeds}
        old = json.loads(args.out.read_text()).get("rows", [])
        runs = [r for r in old if (r["model"], r["way"], r["seed"]) not in done]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["threads"] = 2
    for name in args.models:
        model = baseline(name, train_set, args.baseline_epochs, args.cache)
        for seed in args.seeds:
            for way in args.ways:
                train = DataLoader(short, batch_size=64, shuffle=True)  # seeded by the run
                found = run_one(model, way, args, (train, test), seed)
                runs.append({"model": name, "way": way, "seed": seed, **found})
                shown = {k: v for k, v in runs[-1].items() if k != "trace"}
                print(json.dumps(shown), file=sys.stderr, flush=True)
                write_results(args.out, settings, runs)
    print_table(
        aggregate(runs),
        [
            ("model", "model"),
            ("way", "way"),
            ("seeds", "seeds"),
            ("drop, points (mean ± sd)", "drop_points"),
            (f"within {args.budget * 100:g} points", "within"),
            ("pruning ratio", "ratio"),
            ("MACs x", "macs_x"),
            ("artifact", "artifacts"),
            ("seconds", "seconds"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
