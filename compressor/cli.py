"""`compressor compress`: a thin command-line layer over `Pipeline.run`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

EXAMPLES = """examples:
  compressor compress                          # the embedded demo, no download
  compressor compress --recipe recipe.yaml --output runs/demo --overwrite
  compressor report runs/demo/report.json      # re-render report.md and report.html
  compressor bench runs/demo/model.onnx runs/demo/model.int8.onnx --batch-sizes 1 32
"""

_ARTIFACTS = ("model.onnx", "model.int8.onnx", "report.json", "report.md", "report.html")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `compressor` command."""
    parser = argparse.ArgumentParser(
        prog="compressor",
        description="Take a trained PyTorch model to a small, fast INT8 ONNX file, with a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    compress = commands.add_parser(
        "compress",
        help="run the compression pipeline (with no options: the embedded demo)",
        description="Run the compression pipeline. With no model or data options it trains "
        "the embedded demo model on the embedded Fashion-MNIST subset, then compresses it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipe = compress.add_argument_group("recipe")
    recipe.add_argument("--recipe", type=Path, help="YAML recipe naming the stages and options")
    out = compress.add_argument_group("output")
    out.add_argument(
        "--output", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    out.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty output folder"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    run = compress.add_argument_group("run")
    run.add_argument(
        "--device",
        default=None,
        help="training device: cpu, cuda, cuda:N (default: cuda if available)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed of every training stage (default: 0)"
    )
    run.add_argument(
        "--threads", type=int, default=None, help="CPU threads for measuring (default: all cores)"
    )
    run.add_argument(
        "--limit-train-batches",
        type=int,
        default=None,
        metavar="N",
        help="stop each training epoch after N batches (quick trials)",
    )
    demo = compress.add_argument_group("demo")
    demo.add_argument(
        "--baseline-epochs",
        type=int,
        default=3,
        metavar="N",
        help="epochs to train the demo model before compressing it (default: 3)",
    )
    compress.set_defaults(func=_compress)
    _add_report(commands)
    _add_bench(commands)
    return parser


def _add_report(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="re-render report.md and report.html from a report.json",
        description="Read OUTPUT/report.json, print its table and write report.md and "
        "report.html beside it again (the diagnosis is recomputed).",
    )
    report.add_argument("path", type=Path, help="a report.json, or the output folder holding it")
    report.add_argument(
        "--accuracy-threshold",
        type=float,
        metavar="F",
        help="warn when accuracy falls by more than F (a fraction; default: the report's)",
    )
    report.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    report.set_defaults(func=_report)


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure ONNX files with the report's code and print the same table",
        description="Measure one or more ONNX files in ONNX Runtime, side by side, on seeded "
        "random inputs: p50/p95 latency at the first batch size, throughput at the others.",
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
    bench.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    bench.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="input shape without the batch axis, for models whose shape is dynamic",
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    bench.set_defaults(func=_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"compressor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compressor: interrupted; finished stages' checkpoints are kept", file=sys.stderr)
        return 130


def _compress(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    from .sources import DEMO_RECIPE

    for flag in ("threads", "limit_train_batches", "baseline_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            msg = f"--{flag.replace('_', '-')} must be >= 1 (got: {value})"
            raise UserError(msg)
    pipeline = (
        Pipeline.from_recipe(args.recipe) if args.recipe else Pipeline.from_recipe(DEMO_RECIPE)
    )
    output = _check_output(args.output, args.overwrite)
    from .sources import run_demo

    start = time.perf_counter()
    result = run_demo(
        pipeline,
        output,
        baseline_epochs=args.baseline_epochs,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        limit_train_batches=args.limit_train_batches,
    )
    print(result.report.to_markdown())
    print(f"Wrote {result.onnx_path or output} in {time.perf_counter() - start:.0f} s.")
    return 0


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            msg = f"--{name.replace('_', '-')} must be >= 1 (got: {value})"
            raise UserError(msg)


def _check_output(path: Path, overwrite: bool) -> Path:
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        msg = f"--output {str(path)!r} is a file; give a folder"
        raise UserError(msg)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            msg = (
                f"output folder {str(path)!r} is not empty; "
                "pass --overwrite or choose another --output"
            )
            raise UserError(msg)
        # Remove only what a run writes, so nothing else of the user's is lost.
        for name in _ARTIFACTS:
            (path / name).unlink(missing_ok=True)
        for checkpoint in (path / "checkpoints").glob("[0-9][0-9]_*.pt"):
            checkpoint.unlink()
    return path


def _report(args: argparse.Namespace) -> int:
    from ._io import write_text
    from .report import Report

    path = args.path / "report.json" if args.path.is_dir() else args.path
    report = Report.load(path)
    if args.accuracy_threshold is not None:
        if not 0 <= args.accuracy_threshold < 1:
            msg = f"--accuracy-threshold must be in [0, 1) (got: {args.accuracy_threshold})"
            raise UserError(msg)
        report.accuracy_threshold = args.accuracy_threshold
    write_text(path.parent / "report.md", report.to_markdown())
    write_text(path.parent / "report.html", report.to_html())
    print(report.to_markdown())
    print(f"Wrote {path.parent / 'report.md'} and {path.parent / 'report.html'}.")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, bench_summary

    _check_positive(args, "threads")
    report = bench(
        args.models,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        input_shape=args.input_shape,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report.to_markdown())
    speedups = bench_summary(report)
    if len(speedups) > 1:
        first = report.rows[0].name
        shown = ", ".join(f"{name} {value:.2f}x" for name, value in speedups.items())
        print(f"p50 speedup vs {first}: {shown}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
