"""compressor report: re-render report.md and report.html from a report.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report",
        parents=[common],
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
    report.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from .._io import write_text
    from ..report.report import Report

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
