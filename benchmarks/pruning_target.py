"""A latency target for pruning: is the INT8 file the search picks as fast as it was asked?

For each seed, torchvision's ResNet-18 (seeded random weights, BatchNorm scales drawn from
U(0.5, 1.5) so that channels rank as in a trained model, not all tied at 1) at 224x224:

1. the reference: pruned at ratio 0.5 and quantized as the pipeline's INT8 stage does, its
   batch-1 p50 in ``--runtime`` (ONNX Runtime) timed (the median of three timings);
2. the target: ``--fraction`` (one third) of that latency;
3. ``Pipeline([StructuredPruning(target_latency_ms=target), Int8Quantization()])``: the
   search's choice, and the final INT8 row's own batch-1 p50, taken by the pipeline's
   measuring (a different session and timing loop than the search's).

A run meets the target within 10% when the final p50 is at most 1.1 times the target.
Prints one row per seed and the medians, and writes benchmarks/results/pruning_target.json.

    python benchmarks/pruning_target.py                      # about 5 minutes on 2 cores
    python benchmarks/pruning_target.py --runtime openvino   # timed in OpenVINO
    python benchmarks/pruning_target.py --latency-aware      # latency-aware allocation
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_data, cpu_context, print_table, write_results
from zoo import build

import compressor as cz
from compressor.pruning.engine import prune
from compressor.pruning.target import artifact_measure
from compressor.runtime.measure import count_params_macs

HERE = Path(__file__).parent


def model_for(seed: int, classes: int, name: str = "resnet18") -> torch.nn.Module:
    """torchvision's ``name`` (ResNet-18) with seeded weights and BatchNorm scales spread as
    after training; a ResNet's head gets ``classes`` outputs."""
    model = build(name, seed)
    if hasattr(model, "fc"):
        model.fc = torch.nn.Linear(model.fc.in_features, classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
    return model.eval()


def run(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    model = model_for(seed, args.classes)
    example = torch.randn(1, 3, args.size, args.size)
    data = calibration_data(args.size, args.images)
    quantizer = cz.Int8Quantization(calibration_samples=args.images)
    with tempfile.TemporaryDirectory(prefix="pruning-target-") as tmp:
        runtimes = tuple(dict.fromkeys(("onnxruntime", args.runtime)))
        ctx = cpu_context(data, Path(tmp), args.threads, step="reference", runtimes=runtimes)
        measure = artifact_measure("target_latency_ms", example, ctx, quantizer, args.runtime)
        half = cz.StructuredPruning(ratio=0.5, bn_recalibration_batches=0)
        half_model = prune(copy.deepcopy(model), example, half)[0]  # prunes in place
        reference = measure(half_model)
        target = reference * args.fraction
        print(f"seed {seed}: ratio 0.5 INT8 p50 {reference:.3f} ms; target {target:.3f} ms")
        stages = [
            cz.StructuredPruning(
                target_latency_ms=target,
                target_runtime=args.runtime,
                bn_recalibration_batches=0,
                latency_aware=args.latency_aware,
            ),
            quantizer,
        ]
        result = cz.Pipeline(stages).run(
            model,
            data,
            data,
            output_dir=Path(tmp) / "run",
            progress=False,
            threads=args.threads,
            throughput_batch=8,
            runtimes=runtimes,
        )
    pruned = result.report.row("structured_pruning", "torch")
    search = pruned.details["pruning"]["target"]
    final = result.report.row("int8_quantization", args.runtime)
    base = result.report.row("baseline", "onnxruntime")
    p50 = final.latency_ms["p50"]
    return {
        "seed": seed,
        "ratio_0.5_ms": round(reference, 3),
        "fraction": round(args.fraction, 4),
        "target_ms": round(target, 3),
        "ratio": search["ratio"],
        "search_ms": search["reached"],
        "final_ms": p50,
        "final_vs_target": round(p50 / target, 3),
        "met_10pct": p50 <= 1.1 * target,
        "candidates": len(search["trace"]),
        "search_s": search["seconds"],
        "macs_ratio_0.5": count_params_macs(half_model, example)[1],
        "macs": final.macs,
        "baseline_fp32_ms": base.latency_ms["p50"],
        "trace": search["trace"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fraction", type=float, default=1 / 3, help="of the ratio-0.5 p50")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=16, help="calibration and eval images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument(
        "--latency-aware", action="store_true", help="the search's pruning: latency_aware=True"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "pruning_target" + ("" if args.runtime == "onnxruntime" else f"_{args.runtime}")
    name += "" if abs(args.fraction - 1 / 3) < 1e-9 else f"_{args.fraction:g}"
    name += "_latency_aware" if args.latency_aware else ""
    args.out = args.out or HERE / "results" / f"{name}.json"
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        rows.append(run(seed, args))
        print_table(rows[-1:], COLUMNS)
    summary: dict[str, Any] = {"seed": "median"}
    for key in ("ratio_0.5_ms", "target_ms", "ratio", "final_ms", "final_vs_target", "search_s"):
        summary[key] = round(statistics.median(r[key] for r in rows), 3)
    summary["met_10pct"] = f"{sum(r['met_10pct'] for r in rows)}/{len(rows)}"
    print()
    print_table([*rows, summary], COLUMNS)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out, settings, rows)
    return 0


COLUMNS = [
    ("seed", "seed"),
    ("ratio 0.5 INT8 ms", "ratio_0.5_ms"),
    ("target ms", "target_ms"),
    ("ratio found", "ratio"),
    ("search saw ms", "search_ms"),
    ("final INT8 ms", "final_ms"),
    ("final / target", "final_vs_target"),
    ("within 10%", "met_10pct"),
    ("candidates", "candidates"),
    ("search s", "search_s"),
    ("MACs at 0.5", "macs_ratio_0.5"),
    ("final MACs", "macs"),
    ("baseline FP32 ms", "baseline_fp32_ms"),
]

if __name__ == "__main__":
    sys.exit(main())
