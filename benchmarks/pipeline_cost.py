"""What the pipeline's non-training stages cost: wall time on ResNet-18 at 224x224.

Runs ``Pipeline([StructuredPruning(0.5), Int8Quantization()])`` on torchvision's ResNet-18
(random weights, 1000 classes) with random images: 512 training images (the calibration set),
256 evaluation images, batch 32. The time of each step comes from the report itself
(``row.seconds`` and the INT8 stage's ``details.quantization.seconds``): exporting the
baseline, pruning, the INT8 stage's export / pre-processing / calibration and quantization /
graph check, and measuring every row (accuracy over the eval images, latency, throughput).

    python benchmarks/pipeline_cost.py
    python benchmarks/pipeline_cost.py --eval-samples 1024 --threads 2

Prints a table and writes benchmarks/results/pipeline_cost.json. Target: under 60 s in all.
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
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
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
    with tempfile.TemporaryDirectory(prefix="cost-") as out:
        start = time.perf_counter()
        result = pipeline.run(
            model,
            train,
            val,
            output_dir=out,
            threads=args.threads,
            progress=False,
            runtimes=["onnxruntime"],  # the stages' cost; other runtimes only measure
        )
        total = time.perf_counter() - start
    rows_by = {r.label: r for r in result.report.rows}
    _, base_onnx, pruned, int8 = result.report.rows
    steps = int8.details["quantization"]["seconds"]
    rows = [
        {
            "step": "baseline: export model.onnx (with parity check)",
            "seconds": base_onnx.seconds["stage"],
        },
        {
            "step": "pruning (torch-pruning, BatchNorm recalibration)",
            "seconds": pruned.seconds["stage"],
        },
        {"step": "int8: export", "seconds": steps["export"]},
        {"step": "int8: quant_pre_process", "seconds": steps["pre_process"]},
        {"step": "int8: calibration and quantization", "seconds": steps["calibrate_quantize"]},
        {"step": "int8: graph check, INT8-vs-FP32 timing", "seconds": steps["check"]},
    ]
    rows += [
        {"step": f"measuring {label}", "seconds": row.seconds["measure"]}
        for label, row in rows_by.items()
    ]
    accounted = sum(r["seconds"] for r in rows)
    rows.append(
        {
            "step": "other (model copies, final parity, report files)",
            "seconds": round(total - accounted, 2),
        }
    )
    rows.append({"step": "total", "seconds": round(total, 2)})
    print_table(rows, [("step", "step"), ("seconds", "seconds")])
    print(f"\ntarget (under 60 s): {'met' if total < 60 else 'NOT met'} ({total:.1f} s)")
    settings = {
        "model": "resnet18",
        "ratio": args.ratio,
        "calibration_samples": args.calibration_samples,
        "eval_samples": args.eval_samples,
        "threads": args.threads,
        "total_seconds": round(total, 2),
        "target_met": total < 60,
    }
    write_results(args.out, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
