"""Semantic segmentation end to end: a torchvision segmenter on Fashion-MNIST canvases.

The task is `compressor.segmentation_data.FashionCanvas` built from Debian's
dataset-fashion-mnist (the CLI's ``--data fashion-mnist-seg:DIR``): one to three items pasted
on a 64x64 canvas, 11 classes per pixel (background + the 10 item classes), 12,000 training
canvases from the training split and 2,000 test canvases from the test split.

The model (LR-ASPP on MobileNetV3-Large by default, random initial weights, 3 gray channels)
is trained once (cached), then compressed with sparsity training -> pruning -> pixel-wise
distillation -> INT8 at a short budget, three seeds. Every number comes from the pipeline's
own report (mIoU over the 2,000 test canvases; ONNX files run in ONNX Runtime), except the
peers' INT8 (ONNX Runtime's ``quantize_static`` with its defaults, and NNCF where installed)
of the same baseline file, measured with the same `cz.mean_iou` and the same side-by-side
batch-1 timing. Prints a table of means and spreads and writes
benchmarks/results/segmentation.json after every run.

    apt-get install dataset-fashion-mnist           # Debian: found in /usr/share/datasets
    python benchmarks/segmentation.py               # about 40 minutes on 2 cores
    python benchmarks/segmentation.py --seeds 0 --baseline-epochs 1 --train-batches 20
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
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import files_p50, mean_spread, nncf_int8, ort_default_int8, print_table, write_results
from fashion_mnist import prepare_debian

import compressor as cz
from compressor._io import atomic_path, write_text
from compressor.data import DataSpec
from compressor.measure import ort_predictor, ort_session
from compressor.sources import DataOptions, load_data
from compressor.training import fit_baseline

HERE = Path(__file__).parent
MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def build(name: str, classes: int) -> torch.nn.Module:
    """A torchvision segmentation model with random weights, as ``--model torchvision:`` does."""
    builder = getattr(torchvision.models.segmentation, name)
    kwargs = {"aux_loss": False} if name.startswith(("fcn", "deeplab")) else {}
    return builder(weights=None, weights_backbone=None, num_classes=classes, **kwargs)


def baseline(name: str, train: Any, classes: int, epochs: int, cache: Path) -> torch.nn.Module:
    """``name`` trained ``epochs`` on all training canvases; cached."""
    torch.manual_seed(0)
    model = build(name, classes)
    path = cache / f"segmentation_{name}_e{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    io = cz.ModelIO(output="out", task="segmentation")
    fit_baseline(model, train, epochs=epochs, lr=0.05, seed=0, loss_fn=io.loss_fn())
    print(f"{name}: baseline trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def stages(ratio: float) -> list[cz.Stage]:
    """The short budget: 1 epoch of sparsity training, 2 of distillation."""
    return [
        cz.SparsityTraining(epochs=1),
        cz.StructuredPruning(ratio=ratio),
        cz.Distillation(epochs=2),
        cz.Int8Quantization(),
    ]


def run_one(
    model: torch.nn.Module, args: argparse.Namespace, train: Any, test: Any, seed: int, out: Path
) -> dict[str, Any]:
    """One pipeline run; the table's numbers from its report."""
    start = time.perf_counter()
    result = cz.Pipeline(stages(args.ratio)).run(
        model,
        train,
        test,
        output_dir=out,
        seed=seed,
        threads=2,
        progress=False,
        limit_train_batches=args.train_batches,
    )
    seconds = time.perf_counter() - start
    report = result.report
    rows = {(r.name, r.runtime): r for r in report.rows}
    base = rows[("baseline", "onnxruntime")]
    final = report.rows[-1]
    return {
        "model_io": report.model_io,
        "baseline_miou": base.accuracy,
        "sparsity_miou": rows[("sparsity_training", "torch")].accuracy,
        "pruned_miou": rows[("structured_pruning", "torch")].accuracy,
        "distilled_miou": rows[("distillation", "torch")].accuracy,
        "final_miou": final.accuracy,
        "drop_points": round(100 * (base.accuracy - final.accuracy), 2),
        "macs_x": round(base.macs / final.macs, 2),
        "size_x": report.summary.get("size_ratio"),
        "pixel_agreement": (report.parity or {}).get("top1_agreement"),
        "seconds": round(seconds, 1),
    }


def peers(out: Path, calibration: DataSpec, test: DataSpec) -> dict[str, dict[str, Any]]:
    """mIoU of the peers' INT8 files made from the same baseline ``model.onnx``."""
    files = {
        "ort_default": ort_default_int8(out / "model.onnx", calibration, out / "peer_ort.onnx")
    }
    nncf = nncf_int8(out / "model.onnx", calibration, out / "peer_nncf.onnx")
    if nncf is not None:
        files["nncf"] = nncf
    return {
        name: {"file": path, "miou": cz.mean_iou(ort_predictor(ort_session(path, 2)), test)}
        for name, path in files.items()
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, artifact): compressor's pipeline and each peer's INT8."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        group = [r for r in runs if r["model"] == model]
        base = group[0]["baseline_miou"]
        rows.append(
            {
                "model": model,
                "artifact": "FP32 baseline (model.onnx)",
                "seeds": len(group),
                "miou": round(base, 4),
                "drop_points": "0.00",
                "macs_x": "1.00",
                "speedup_bs1": "1.00",
                "p50_ms": mean_spread([r["p50_ms"]["fp32"] for r in group]),
            }
        )
        rows.append(
            {
                "model": model,
                "artifact": "compressor: pruned + INT8",
                "seeds": len(group),
                "miou": round(statistics.fmean(r["final_miou"] for r in group), 4),
                "drop_points": mean_spread([r["drop_points"] for r in group]),
                "macs_x": mean_spread([r["macs_x"] for r in group]),
                "speedup_bs1": mean_spread(
                    [r["p50_ms"]["fp32"] / r["p50_ms"]["compressor"] for r in group]
                ),
                "p50_ms": mean_spread([r["p50_ms"]["compressor"] for r in group]),
            }
        )
        for peer in group[0]["peers"]:
            values = [r["peers"][peer]["miou"] for r in group]
            rows.append(
                {
                    "model": model,
                    "artifact": f"{peer} INT8 of the baseline",
                    "seeds": len(group),
                    "miou": round(statistics.fmean(values), 4),
                    "drop_points": mean_spread(
                        [100 * (r["baseline_miou"] - r["peers"][peer]["miou"]) for r in group]
                    ),
                    "macs_x": "1.00",
                    "speedup_bs1": mean_spread(
                        [r["p50_ms"]["fp32"] / r["p50_ms"][peer] for r in group]
                    ),
                    "p50_ms": mean_spread([r["p50_ms"][peer] for r in group]),
                }
            )
    return rows


def save(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    settings = {
        "input_size": args.input_size,
        "ratio": args.ratio,
        "baseline_epochs": args.baseline_epochs,
        "test_canvases": args.test_canvases,
        "train_batches": args.train_batches,
        "threads": 2,
    }
    write_results(args.out, settings, aggregate(runs))
    data = json.loads(args.out.read_text())
    data["runs"] = runs
    write_text(args.out, json.dumps(data, indent=2, default=str) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=[MODELS[0]])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--baseline-epochs", type=int, default=6)
    parser.add_argument(
        "--train-batches",
        type=int,
        default=125,
        help="training batches (of 32) per epoch of the pipeline's stages",
    )
    parser.add_argument("--test-canvases", type=int, default=None, help="default: all 2,000")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "segmentation.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    prepare_debian(args.data)
    options = DataOptions(input_size=args.input_size, channels=3, batch_size=32)
    train, test, info = load_data(f"fashion-mnist-seg:{args.data}", options)
    if args.test_canvases:
        subset = torch.utils.data.Subset(test.dataset, range(args.test_canvases))
        test = torch.utils.data.DataLoader(subset, batch_size=32)
    test_spec = DataSpec(test)
    torch.manual_seed(0)
    calibration = DataSpec([b for b, _ in zip(train, range(8), strict=False)])  # 256 canvases
    example = next(iter(test))[0][:1]
    runs: list[dict[str, Any]] = []
    for name in args.models:
        model = baseline(name, train, info.num_classes, args.baseline_epochs, args.cache)
        for seed in args.seeds:
            out = args.cache / "segmentation" / f"{name}_{seed}"
            found = run_one(model, args, train, test, seed, out)
            others = peers(out, calibration, test_spec)
            files = {"fp32": out / "model.onnx", "compressor": out / "model.int8.onnx"}
            files.update({peer: found["file"] for peer, found in others.items()})
            found["p50_ms"] = files_p50(files, example)
            found["peers"] = {peer: {"miou": v["miou"]} for peer, v in others.items()}
            runs.append({"model": name, "seed": seed, **found})
            print(json.dumps(runs[-1], default=str), file=sys.stderr, flush=True)
            save(args, runs)
    print_table(
        aggregate(runs),
        [
            ("model", "model"),
            ("artifact", "artifact"),
            ("seeds", "seeds"),
            ("mIoU (mean)", "miou"),
            ("drop, points", "drop_points"),
            ("MACs x", "macs_x"),
            ("p50 ms, bs 1", "p50_ms"),
            ("speedup vs ORT FP32", "speedup_bs1"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
