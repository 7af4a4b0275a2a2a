"""What the segmentation and detection benchmarks share: the command line, one compress
run per seed, the peers' INT8 of the same baseline file, the table and the results file.

A task script gives its models, how to build one untrained with its `cz.ModelIO` (whose
``loss_fn`` trains the baseline and whose ``eval_fn`` scores the peers too), its data source
and its metric's name (``miou`` or ``map``); `main` does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    TABLE_RUN,
    files_p50,
    mean_spread,
    nncf_int8,
    ort_default_int8,
    print_table,
    write_results,
)
from fashion_mnist import prepare_debian

import compressor as cz
from compressor._io import atomic_path, write_text
from compressor.data import DataSpec
from compressor.pruning.plan import IMPORTANCES
from compressor.runtime.measure import ort_predictor, ort_session
from compressor.sources.data_specs import DataOptions, load_data
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent
# (model name, a training batch, classes) -> (untrained model, its ModelIO)
Builder = Callable[[str, Any, int], tuple[torch.nn.Module, cz.ModelIO]]


def baseline(
    build: Builder, name: str, train: Any, classes: int, epochs: int, path: Path
) -> tuple[torch.nn.Module, cz.ModelIO]:
    """``name`` trained ``epochs`` on all of ``train`` (cached at ``path``), and its IO."""
    torch.manual_seed(0)
    model, io = build(name, next(iter(train)), classes)
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


def stages(
    ratio: float,
    distill_epochs: int = 2,
    target_macs: str | None = None,
    importance: str = "auto",
) -> list[cz.Stage]:
    """The short budget: 1 epoch of sparsity training, 2 of distillation (by default);
    pruning at ``ratio``, or to ``target_macs`` (the stage searches the ratio), channels
    ranked by ``importance``."""
    pruning = (
        cz.StructuredPruning(target_macs=target_macs, importance=importance)
        if target_macs
        else cz.StructuredPruning(ratio=ratio, importance=importance)
    )
    return [
        cz.SparsityTraining(epochs=1),
        pruning,
        cz.Distillation(epochs=distill_epochs),
        cz.Int8Quantization(),
    ]


def run_one(
    model: torch.nn.Module,
    io: cz.ModelIO,
    args: argparse.Namespace,
    data: tuple[Any, Any],
    seed: int,
    out: Path,
    metric: str,
) -> dict[str, Any]:
    """One pipeline run; the table's numbers from its report."""
    start = time.perf_counter()
    result = cz.Pipeline(
        stages(args.ratio, args.distill_epochs, args.target_macs, args.importance),
        max_accuracy_drop=args.max_accuracy_drop,
    ).run(
        model,
        *data,
        io=io,
        output_dir=out,
        seed=seed,
        **TABLE_RUN,
        limit_train_batches=args.train_batches or None,
        runtimes=args.runtimes,
    )
    seconds = time.perf_counter() - start
    report = result.report
    rows = {(r.name, r.runtime): r for r in report.rows}
    base = rows[("baseline", "onnxruntime")]
    final = rows[(report.rows[-1].name, "onnxruntime")]
    others = {
        f"final_{metric}_{runtime}": rows[(final.name, runtime)].accuracy
        for runtime in args.runtimes
        if runtime != "onnxruntime"
    }
    return {
        "model_io": report.model_io,
        f"baseline_{metric}": base.accuracy,
        f"sparsity_{metric}": rows[("sparsity_training", "torch")].accuracy,
        f"pruned_{metric}": rows[("structured_pruning", "torch")].accuracy,
        f"distilled_{metric}": rows[("distillation", "torch")].accuracy,
        f"final_{metric}": final.accuracy,
        "drop_points": round(100 * (base.accuracy - final.accuracy), 2),
        "macs_x": round(base.macs / final.macs, 2),
        "ratio": rows[("structured_pruning", "torch")].details.get("pruning", {}).get("ratio"),
        "size_x": report.summary.get("size_ratio"),
        "agreement": (report.parity or {}).get("top1_agreement"),
        **others,
        "budget_met": result.budget_met,
        "file": result.onnx_path,
        "seconds": round(seconds, 1),
    }


def peers(out: Path, calibration: DataSpec, test: DataSpec, io: cz.ModelIO) -> dict[str, Any]:
    """The peers' INT8 files of the same baseline ``model.onnx``, scored by the task's metric."""
    files = {
        "ort_default": ort_default_int8(out / "model.onnx", calibration, out / "peer_ort.onnx")
    }
    nncf = nncf_int8(out / "model.onnx", calibration, out / "peer_nncf.onnx")
    if nncf is not None:
        files["nncf"] = nncf
    return {
        name: {"file": path, "score": io.eval_fn()(ort_predictor(ort_session(path, 2)), test)}
        for name, path in files.items()
    }


def aggregate(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per (model, artifact): compressor's pipeline and each peer's INT8."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        group = [r for r in runs if r["model"] == model]
        base = group[0][f"baseline_{metric}"]
        fp32 = [r["p50_ms"]["fp32"] for r in group]
        rows.append(
            {
                "model": model,
                "artifact": "FP32 baseline (model.onnx)",
                "seeds": len(group),
                metric: round(base, 4),
                "drop_points": "0.00",
                "macs_x": "1.00",
                "speedup_bs1": "1.00",
                "p50_ms": mean_spread(fp32),
            }
        )
        rows.append(
            {
                "model": model,
                "artifact": "compressor: pruned + INT8",
                "seeds": len(group),
                metric: round(statistics.fmean(r[f"final_{metric}"] for r in group), 4),
                "drop_points": mean_spread([r["drop_points"] for r in group]),
                "macs_x": mean_spread([r["macs_x"] for r in group]),
                "speedup_bs1": mean_spread(
                    [r["p50_ms"]["fp32"] / r["p50_ms"]["compressor"] for r in group]
                ),
                "p50_ms": mean_spread([r["p50_ms"]["compressor"] for r in group]),
            }
        )
        for runtime in [k.removeprefix("p50_ms_") for k in group[0] if k.startswith("p50_ms_")]:
            times = [r[f"p50_ms_{runtime}"] for r in group]
            finals = [r[f"final_{metric}_{runtime}"] for r in group]
            bases = [r[f"baseline_{metric}"] for r in group]
            drops = [100 * (b - f) for b, f in zip(bases, finals, strict=True)]
            rows.append(
                {
                    "model": model,
                    "artifact": f"FP32 baseline (model.onnx) in {runtime}",
                    "seeds": len(group),
                    "p50_ms": mean_spread([t["fp32"] for t in times]),
                    "speedup_bs1": "1.00",
                }
            )
            rows.append(
                {
                    "model": model,
                    "artifact": f"compressor: pruned + INT8 in {runtime}",
                    "seeds": len(group),
                    metric: round(statistics.fmean(finals), 4),
                    "drop_points": mean_spread(drops),
                    "macs_x": mean_spread([r["macs_x"] for r in group]),
                    "speedup_bs1": mean_spread([t["fp32"] / t["compressor"] for t in times]),
                    "p50_ms": mean_spread([t["compressor"] for t in times]),
                }
            )
        for peer in group[0]["peers"]:
            values = [r["peers"][peer][metric] for r in group]
            rows.append(
                {
                    "model": model,
                    "artifact": f"{peer} INT8 of the baseline",
                    "seeds": len(group),
                    metric: round(statistics.fmean(values), 4),
                    "drop_points": mean_spread(
                        [100 * (r[f"baseline_{metric}"] - r["peers"][peer][metric]) for r in group]
                    ),
                    "macs_x": "1.00",
                    "speedup_bs1": mean_spread(
                        [r["p50_ms"]["fp32"] / r["p50_ms"][peer] for r in group]
                    ),
                    "p50_ms": mean_spread([r["p50_ms"][peer] for r in group]),
                }
            )
    return rows


def save(args: argparse.Namespace, runs: list[dict[str, Any]], metric: str) -> None:
    settings = {
        "input_size": args.input_size,
        "ratio": None if args.target_macs else args.ratio,
        "target_macs": args.target_macs,
        "importance": args.importance,
        "baseline_epochs": args.baseline_epochs,
        "test_canvases": args.test_canvases,
        "train_batches": args.train_batches,
        "distill_epochs": args.distill_epochs,
        "max_accuracy_drop": args.max_accuracy_drop,
        "threads": 2,
    }
    write_results(args.out, settings, aggregate(runs, metric))
    data = json.loads(args.out.read_text())
    data["runs"] = runs
    write_text(args.out, json.dumps(data, indent=2, default=str) + "\n")


def main(
    description: str,
    *,
    models: tuple[str, ...],
    task: str,
    source: str,
    metric: str,
    label: str,
    build: Builder,
    defaults: dict[str, Any],
) -> int:
    """Parse the command line, then per model and seed: compress, run the peers, time the
    files side by side; print the table and write the results after every run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--models", nargs="+", choices=models, default=[models[0]])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--input-size", type=int, default=defaults["input_size"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument(
        "--target-macs", default=None, help="prune to at most these MACs (e.g. 16.7M), not --ratio"
    )
    parser.add_argument(
        "--importance", default="auto", choices=IMPORTANCES, help="structured_pruning.importance"
    )
    parser.add_argument("--baseline-epochs", type=int, default=defaults["baseline_epochs"])
    parser.add_argument(
        "--train-batches",
        type=int,
        default=125,
        help="training batches (of 32) per epoch of the pipeline's stages (0: whole epochs)",
    )
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="the pipeline's accuracy budget against the baseline (0.015: 1.5 points)",
    )
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=("onnxruntime", "openvino"),
        default=["onnxruntime"],
        help="where the files are scored and timed (ONNX Runtime always; OpenVINO besides)",
    )
    parser.add_argument("--test-canvases", type=int, default=None, help="default: all 2,000")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"{task}.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    args.runtimes = list(dict.fromkeys(["onnxruntime", *args.runtimes]))
    prepare_debian(args.data)
    options = DataOptions(input_size=args.input_size, channels=3, batch_size=32)
    train, test, info = load_data(f"{source}:{args.data}", options)
    if args.test_canvases:
        subset = torch.utils.data.Subset(test.dataset, range(args.test_canvases))
        test = torch.utils.data.DataLoader(subset, batch_size=32, collate_fn=test.collate_fn)
    test_spec = DataSpec(test)
    torch.manual_seed(0)
    calibration = DataSpec([b for b, _ in zip(train, range(8), strict=False)])  # 256 canvases
    example = next(iter(test))[0][:1]
    runs: list[dict[str, Any]] = []
    for name in args.models:
        cached = args.cache / f"{task}_{name}_{args.input_size}_e{args.baseline_epochs}.pt"
        model, io = baseline(build, name, train, info.num_classes, args.baseline_epochs, cached)
        for seed in args.seeds:
            out = args.cache / task / f"{name}_{seed}"
            found = run_one(model, io, args, (train, test), seed, out, metric)
            others = peers(out, calibration, test_spec, io)
            files = {"fp32": out / "model.onnx", "compressor": found.pop("file")}
            files.update({peer: found["file"] for peer, found in others.items()})
            for runtime in args.runtimes:
                key = "p50_ms" if runtime == "onnxruntime" else f"p50_ms_{runtime}"
                found[key] = files_p50(files, example, runtime=runtime)
            found["peers"] = {peer: {metric: v["score"]} for peer, v in others.items()}
            runs.append({"model": name, "seed": seed, **found})
            print(json.dumps(runs[-1], default=str), file=sys.stderr, flush=True)
            save(args, runs, metric)
    print_table(
        aggregate(runs, metric),
        [
            ("model", "model"),
            ("artifact", "artifact"),
            ("seeds", "seeds"),
            (f"{label} (mean)", metric),
            ("drop, points", "drop_points"),
            ("MACs x", "macs_x"),
            ("p50 ms, bs 1", "p50_ms"),
            ("speedup vs ORT FP32", "speedup_bs1"),
        ],
    )
    return 0
