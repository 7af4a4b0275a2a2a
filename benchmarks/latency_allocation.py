"""Latency-aware pruning allocation against uniform and importance-only, at equal MACs.

For each seed, torchvision's ResNet-18 (or ``--model``) at 224x224 (seeded random weights,
BatchNorm scales spread as after training: `pruning_target.model_for`) is pruned three ways
to the same MACs:

- ``uniform``: every channel group loses the same share (``global_pruning=False``, ratio 0.5);
  its MACs are the target of the two others;
- ``global``: channels ranked by importance across groups (the default), ``target_macs``;
- ``latency``: ranked by importance per millisecond saved, from the per-layer INT8 latency
  table (``latency_aware=True``), ``target_macs``.

Each pruned model is quantized as the pipeline's INT8 stage does it, and the three INT8 files
are timed at batch 1 in ONNX Runtime side by side (interleaved rounds, pooled, so a slow spell
of the machine falls on all three). Prints one row per seed and variant and the medians over
the seeds, and writes benchmarks/results/latency_allocation[_MODEL][_Nt].json.

    python benchmarks/latency_allocation.py          # about 5 minutes on 2 cores
    python benchmarks/latency_allocation.py --model mobilenet_v2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_data, compressor_int8, print_table, side_by_side, write_results
from pruning_target import model_for

import compressor as cz
from compressor.pruning.engine import prune
from compressor.runtime.measure import count_params_macs, onnx_predictor

HERE = Path(__file__).parent
VARIANTS = ("uniform", "global", "latency")


def run(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = model_for(seed, args.classes, args.model)
    example = torch.randn(1, 3, args.size, args.size)
    data = calibration_data(args.size, args.images)
    _, macs_before = count_params_macs(model, example)
    rows, files = [], {}
    with (
        tempfile.TemporaryDirectory(prefix="latency-allocation-") as tmp,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        target = None
        for variant in VARIANTS:
            if variant == "uniform":
                options = cz.StructuredPruning(ratio=args.ratio, global_pruning=False)
            else:
                options = cz.StructuredPruning(
                    target_macs=target, latency_aware=variant == "latency"
                )
                search = options.resolve(model, example, None)[1]
                # MACs jump with the ratio (a group loses round_to channels at a time): the
                # candidate closest to the target, above or below, is the equal-MACs one
                closest = min(search.trace, key=lambda c: abs(c["value"] - target))
                options = options.at_ratio(closest["ratio"])
            start = time.perf_counter()
            pruned, details = prune(copy.deepcopy(model), example, options, threads=args.threads)
            seconds = time.perf_counter() - start
            _, macs = count_params_macs(pruned, example)
            target = target or macs
            out = Path(tmp) / variant
            files[variant], _ = compressor_int8(pruned, example, data, out, args.threads)
            table = details["pruning"].get("latency_table") or {}
            rows.append(
                {
                    "seed": seed,
                    "variant": variant,
                    "ratio": round(options.ratio, 4),
                    "macs": macs,
                    "macs_vs_uniform": round(macs / target, 4),
                    "macs_x": round(macs_before / macs, 2),
                    "layer_share_min": details["pruning"]["layer_ratio_min"],
                    "layer_share_max": details["pruning"]["layer_ratio_max"],
                    "prune_s": round(seconds, 1),
                    "table_s": table.get("seconds"),
                    "costs": table.get("groups"),
                }
            )
        x = example
        predictors = {v: onnx_predictor(files[v], args.threads) for v in VARIANTS}
        timed = side_by_side({v: (lambda p=p: p(x)) for v, p in predictors.items()}, args.rounds)
    for row in rows:
        row["int8_p50_ms"] = timed[row["variant"]]["p50"]
        row["vs_uniform"] = round(timed[row["variant"]]["p50"] / timed["uniform"]["p50"], 3)
    return rows


COLUMNS = [
    ("seed", "seed"),
    ("allocation", "variant"),
    ("ratio", "ratio"),
    ("MACs x", "macs_x"),
    ("MACs / uniform's", "macs_vs_uniform"),
    ("group share min-max", "shares"),
    ("INT8 p50 ms (ORT, bs 1)", "int8_p50_ms"),
    ("p50 / uniform's", "vs_uniform"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5, help="uniform's ratio")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=16, help="calibration images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = "" if args.model == "resnet18" else f"_{args.model}"
    suffix += "" if args.threads == 2 else f"_{args.threads}t"
    args.out = args.out or HERE / "results" / f"latency_allocation{suffix}.json"
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        found = run(seed, args)
        for row in found:
            row["shares"] = f"{row['layer_share_min']:.2f}-{row['layer_share_max']:.2f}"
        rows += found
        print_table(found, COLUMNS)
    medians = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        medians.append(
            {
                "seed": "median",
                "variant": variant,
                "macs_x": statistics.median(r["macs_x"] for r in mine),
                "macs_vs_uniform": statistics.median(r["macs_vs_uniform"] for r in mine),
                "int8_p50_ms": statistics.median(r["int8_p50_ms"] for r in mine),
                "vs_uniform": statistics.median(r["vs_uniform"] for r in mine),
            }
        )
    print()
    print_table(rows + medians, COLUMNS)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
