"""The `compressor` command: a thin layer over the Python API.

``compress`` runs the pipeline on a model and data named by specs (see `sources`),
``report`` re-renders a report, ``bench`` measures ONNX files. User errors print one line
and exit with status 2; ``--debug`` shows their traceback. A run that finished but missed
its accuracy budget (``--max-accuracy-drop``) exits with status 3 (`OVER_BUDGET_STATUS`).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from ._io import NO_SPACE
from .commands import bench, compress, export, load, report, serve
from .commands.common import EXAMPLES
from .commands.compress import OVER_BUDGET_STATUS as OVER_BUDGET_STATUS
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `compressor` command."""
    parser = argparse.ArgumentParser(
        prog="compressor",
        description="Take a trained PyTorch model to a small, fast INT8 ONNX file, with a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    compress.add_parser(commands, common)
    report.add_parser(commands, common)
    bench.add_parser(commands, common)
    load.add_parser(commands, common)
    serve.add_parser(commands, common)
    export.add_parser(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        text = str(exc)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its own message
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(text.split())  # one line, whatever the message holds
        print(f"compressor: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        print(
            f"compressor: error: {exc.strerror} ({exc.filename or 'a temporary file'}): free "
            "space and rerun; a pipeline run continues with --resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "output", None)
        kept = f" in {where}" if where is not None else ""
        print(
            f"compressor: interrupted; the finished stages are kept{kept}: rerun the same "
            "command with --resume to continue from them",
            file=sys.stderr,
        )
        return 130


def _version() -> str:
    from ._version import __version__

    return f"compressor {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
