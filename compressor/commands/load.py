"""compressor load: load-test ONNX files or a running server under concurrent requests."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime.runtimes import ONNX_RUNTIMES
from .common import check_positive


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    load = commands.add_parser(
        "load",
        parents=[common],
        help="closed-loop load test of ONNX files (or of a running server) at several "
        "concurrency levels",
        description="N clients each send one request (one row) at a time and wait for the "
        "answer, at each concurrency level, bounded in requests and seconds. By default each "
        "file runs in this process under four settings: one session with every core and one "
        "session per core, each without batching and with the dynamic batcher. Per level: "
        "throughput, p50/p90/p95/p99 latency, rows per run, queue vs run time, and a queueing "
        "estimate. With --url, the clients talk to a running server over HTTP instead.",
    )
    load.add_argument("models", nargs="*", type=Path, metavar="MODEL.onnx")
    load.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16, 32, 64],
        metavar="N",
        help="client counts (default: 1 2 4 8 16 32 64)",
    )
    load.add_argument(
        "--requests", type=int, default=400, metavar="N", help="requests per level (default: 400)"
    )
    load.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="longest a level runs (default: 5)",
    )
    load.add_argument(
        "--p99-ms",
        type=float,
        default=50.0,
        metavar="MS",
        help="the latency bound the best setting must keep (default: 50)",
    )
    load.add_argument(
        "--threads", type=int, metavar="N", help="cores to split between sessions (default: all)"
    )
    load.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="the dynamic batcher's largest batch (default: 32)",
    )
    load.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="input shape without the batch axis, for models whose shape is dynamic",
    )
    load.add_argument(
        "--runtime",
        nargs="+",
        default=["onnxruntime"],
        choices=ONNX_RUNTIMES,
        metavar="NAME",
        help="run the files in these runtimes: onnxruntime, openvino (default: onnxruntime)",
    )
    load.add_argument("--url", metavar="URL", help="load a running server (http://HOST:PORT)")
    load.add_argument("--name", help="the model's name on the server (with --url)")
    load.add_argument(
        "--json-tensors",
        action="store_true",
        help="with --url, send tensors as JSON lists instead of the binary extension",
    )
    load.add_argument("--json", action="store_true", help="print the results as JSON")
    load.set_defaults(func=_load)


def _load(args: argparse.Namespace) -> int:
    from ..runtime.load import default_settings, load_file, load_url, to_markdown

    check_positive(args, "threads", "max_batch", "requests")
    if args.seconds <= 0 or args.p99_ms <= 0:
        msg = f"--seconds and --p99-ms must be > 0 (got: {args.seconds}, {args.p99_ms})"
        raise UserError(msg)
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    common = {
        "levels": args.concurrency,
        "max_requests": args.requests,
        "max_seconds": args.seconds,
        "input_shape": args.input_shape,
        "p99_ms": args.p99_ms,
        "progress": say,
    }
    if args.url:
        if args.models or not args.name:
            msg = "--url loads a server: give the model's --name, and no MODEL.onnx"
            raise UserError(msg)
        results = [load_url(args.url, args.name, binary=not args.json_tensors, **common)]
    elif not args.models:
        msg = "give one or more MODEL.onnx files, or --url and --name of a running server"
        raise UserError(msg)
    else:
        settings = default_settings(args.threads, args.max_batch, args.runtime)
        results = [load_file(m, settings=settings, **common) for m in args.models]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(to_markdown(results))
    return 0
