"""compressor bench: measure ONNX files in every runtime, without a pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import add_runtime, check_positive


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="measure ONNX files with the report's code and print the same table",
        description="Measure one or more ONNX files in every installed ONNX runtime (or those "
        "--runtime names), side by side, on seeded random inputs: p50/p95 latency at the "
        "first batch size, throughput at the others.",
    )
    bench.add_argument("models", nargs="+", type=Path, metavar="MODEL.onnx")
    bench.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[1, 32],
        metavar="N",
        help="latency at the first, throughput at the rest (default: 1 32)",
    )
    bench.add_argument(
        "--threads", type=int, metavar="N", help="runtime threads (default: all cores)"
    )
    bench.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="input shape without the batch axis, for models whose shape is dynamic",
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_runtime(bench)
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..report.bench import bench, bench_summary

    check_positive(args, "threads")
    report = bench(
        args.models,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        input_shape=args.input_shape,
        runtimes=args.runtime,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report.to_markdown())
    speedups = bench_summary(report)
    if len(speedups) > 1:
        first = next(iter(speedups))
        shown = ", ".join(f"{name} {value:.2f}x" for name, value in speedups.items())
        print(f"p50 speedup vs {first}: {shown}")
    return 0
