"""`compressor compress`: a thin command-line layer over `Pipeline.run`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

EXAMPLES = """examples:
  compressor compress                          # the embedded demo, no download
  compressor compress --recipe recipe.yaml --output runs/demo --overwrite
"""

_ARTIFACTS = ("model.onnx", "model.int8.onnx", "report.json", "report.md")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _compress(args)
    except UserError as exc:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
