"""compressor serve: an ONNX file behind the KServe V2 / Triton HTTP protocol."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime.runtimes import ONNX_RUNTIMES
from .common import add_batching, check_positive, replicas_range


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve an ONNX file over HTTP (KServe V2 / Triton protocol) with dynamic batching",
        description="Serve MODEL.onnx with the Open Inference Protocol's REST form "
        "(GET /v2/health/live, /v2/health/ready, /v2/models/NAME; POST "
        "/v2/models/NAME/infer, JSON or binary tensors), behind a dynamic batcher with a "
        "bounded queue. Ctrl-C or SIGTERM stops it after the requests in flight finish. "
        "Needs the serve extra: pip install 'compressor[serve]'.",
    )
    serve.add_argument("model", type=Path, metavar="MODEL.onnx")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; the server has "
        "no authentication, so put a proxy in front before listening elsewhere)",
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port (default: 8000; 0: any free one)"
    )
    serve.add_argument("--name", help="the model's name in URLs (default: the file's stem)")
    serve.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=ONNX_RUNTIMES,
        help="the runtime behind the server: onnxruntime (default) or openvino "
        "(pip install 'compressor[openvino]')",
    )
    add_batching(serve, 16, 2.0)
    serve.add_argument(
        "--max-rows",
        type=int,
        default=64,
        metavar="N",
        help="most rows one request may hold; larger ones get HTTP 400 (default: 64)",
    )
    serve.add_argument(
        "--sessions",
        type=int,
        default=1,
        metavar="N",
        help="ONNX Runtime sessions running batches side by side (default: 1)",
    )
    serve.add_argument(
        "--threads", type=int, metavar="N", help="intra-op threads per session (default: all "
        "cores divided by --sessions)"
    )  # fmt: skip
    serve.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray Serve replicas, each a session of "
        "--threads threads (pip install 'compressor[ray]')",
    )
    serve.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="with --engine ray: replicas"
    )
    serve.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="with --engine ray: scale between MIN and MAX replicas on concurrent requests",
    )
    serve.add_argument(
        "--address",
        metavar="ADDR",
        help="with --engine ray: an existing Ray cluster (default: start a local one)",
    )
    serve.add_argument(
        "--stop-after-requests",
        type=int,
        metavar="N",
        help="stop after N infer requests (for scripts and tests)",
    )
    serve.add_argument("--stop-after-s", type=float, metavar="S", help="stop after S seconds")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..runtime.batching import BatchSettings
    from ..runtime.measure import default_threads
    from ..runtime.serve import serve

    check_positive(args, "sessions", "threads", "max_batch", "max_queue", "max_rows", "replicas")
    if args.engine == "local" and (args.autoscale or args.address or args.replicas != 1):
        raise UserError("--replicas, --autoscale and --address need --engine ray")
    # the cores are shared by the sessions here, by the (first) replicas on Ray
    sharing = args.sessions
    if args.engine == "ray":
        sharing = replicas_range(args.replicas, args.autoscale)[0]
    threads = args.threads or max(1, default_threads() // sharing)
    settings = BatchSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        sessions=args.sessions,
        threads=threads,
        max_queue=args.max_queue,
        max_rows=args.max_rows,
        runtime=args.runtime,
    )

    if args.engine == "ray":
        return _serve_ray(args, settings)

    def ready(url: str) -> None:
        name = args.name or args.model.stem
        print(
            f"compressor: serving {name} at {url}/v2/models/{name} ({settings.label}); "
            "Ctrl-C stops",
            flush=True,
        )

    answered = serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        settings=settings,
        stop_after_requests=args.stop_after_requests,
        stop_after_s=args.stop_after_s,
        on_ready=ready,
    )
    print(f"compressor: stopped after {answered} infer request(s)", flush=True)
    return 0


def _serve_ray(args: argparse.Namespace, settings: Any) -> int:
    from ..runtime.ray_serve import RayOptions, serve_ray

    if args.stop_after_requests:
        raise UserError("--stop-after-requests is not available with --engine ray")
    options = RayOptions(
        replicas=replicas_range(args.replicas, args.autoscale), address=args.address
    )
    name = args.name or args.model.stem

    def ready(url: str) -> None:
        print(
            f"compressor: serving {name} at {url}/v2/models/{name} on Ray Serve "
            f"({options.replicas[0]}-{options.replicas[1]} replicas, {settings.label}); "
            "Ctrl-C stops",
            flush=True,
        )

    serve_ray(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        settings=settings,
        options=options,
        stop_after_s=args.stop_after_s,
        on_ready=ready,
    )
    print("compressor: stopped", flush=True)
    return 0
