"""What the pipeline's non-training stages cost: wall time on ResNet-18 at 224x224.

Runs ``Pipeline([StructuredPruning(0.5), Int8Quantization()])`` on torchvision's ResNet-18
(random weights, 1000 classes) with random images: 512 training images (the calibration set),
2,000 evaluation images, batch 32, measured in every installed runtime (ONNX Runtime and
OpenVINO). The time of each step comes from the report itself (``row.seconds``, the INT8
stage's ``details.quantization.seconds`` and the report's ``seconds`` by phase): exporting the
baseline, pruning, the INT8 stage's export / pre-processing / calibration and quantization /
graph check, and measuring every row (accuracy over the eval images, latency, throughput).
``--full-eval`` evaluates every row in its own runtime (`Pipeline.run`'s
``full_evaluation``), to compare the accuracies and the time with the default.

    python benchmarks/pipeline_cost.py
    python benchmarks/pipeline_cost.py --eval-samples 256 --runtimes onnxruntime

Prints a table and writes benchmarks/results/pipeline_cost.json. Target (issue 47): under 90 s
in all with 2,000 eval images and both runtimes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

import compressor as cz


def random_images(samples: int, seed: int) -> DataLoader:
    """``samples`` seeded random 3x224x224 images with labels in 0..999, batches of 32."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 1000, (samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=32)


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--runtimes", nargs="+", default=None, help="default: every installed")
    parser.add_argument("--full-eval", action="store_true", help="every row evaluated in full")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--target-s", type=float, default=90.0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/pipeline_cost.json"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    train = random_images(args.calibration_samples, seed=0)
    val = random_images(args.eval_samples, seed=1)
    pipeline = cz.Pipeline(
        [
            cz.StructuredPruning(ratio=args.ratio),
            cz.Int8Quantization(calibration_samples=args.calibration_samples),
        ]
    )
    options = {"full_evaluation": True} if args.full_eval else {}
    with tempfile.TemporaryDirectory(prefix="cost-") as out:
        start = time.perf_counter()
        result = pipeline.run(
            model,
            train,
            val,
            output_dir=out,
            threads=args.threads,
            progress=False,
            runtimes=args.runtimes,
            **options,
        )
        total = time.perf_counter() - start
    report = result.report
    base_onnx = report.row("baseline", "onnxruntime")
    pruned = report.row("structured_pruning")
    steps = report.row("int8_quantization", "onnxruntime").details["quantization"]["seconds"]
    named = [
        ("baseline: export model.onnx (parity check)", base_onnx.seconds["stage"]),
        ("pruning (torch-pruning, BatchNorm recalibration)", pruned.seconds["stage"]),
        *((f"int8: {step}", seconds) for step, seconds in steps.items()),
    ]
    rows: list[dict] = [{"step": step, "seconds": seconds} for step, seconds in named]
    for row in report.rows:
        shared = "accuracy_from" in row.details
        rows.append(
            {
                "step": f"measuring {row.label}" + (" (accuracy shared)" if shared else ""),
                "seconds": row.seconds["measure"],
                "accuracy": row.accuracy,
            }
        )
    accounted = sum(r["seconds"] for r in rows)
    other = round(total - accounted, 2)
    rows.append({"step": "other (model copies, final parity, report files)", "seconds": other})
    rows.append({"step": "total", "seconds": round(total, 2)})
    print_table(rows, [("step", "step"), ("seconds", "seconds"), ("accuracy", "accuracy")])
    met = total < args.target_s
    print(f"\ntarget (under {args.target_s:g} s): {'met' if met else 'NOT met'} ({total:.1f} s)")
    phases = getattr(report, "seconds", None)  # (reports before issue 47 have none)
    if phases:
        print(report.time_line())
    settings = {
        "model": "resnet18",
        "ratio": args.ratio,
        "calibration_samples": args.calibration_samples,
        "eval_samples": args.eval_samples,
        "runtimes": sorted({r.runtime for r in report.rows} - {"torch"}),
        "full_evaluation": args.full_eval,
        "threads": args.threads,
        "total_seconds": round(total, 2),
        "phases": phases,
        "target_s": args.target_s,
        "target_met": met,
    }
    write_results(args.out, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
