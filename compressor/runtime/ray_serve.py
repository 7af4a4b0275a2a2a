"""`compressor serve --engine ray`: the artifact on Ray Serve replicas, past one process.

Each replica holds the ONNX file in its own `DynamicBatcher` (one session of ``threads``
intra-op threads, the measured largest batch and longest wait) behind the same `V2Protocol`
as `compressor serve`, so clients (tritonclient, curl, `compressor load --url`) see the same
routes, answers and 4xx errors; Ray Serve's HTTP proxy spreads requests over the replicas,
restarts one whose process dies, and scales between a minimum and a maximum on concurrent
requests when asked. Each replica reserves ``threads`` CPUs from Ray and, on a cluster this
process started, is pinned to its own cores so that replicas do not fight over them.

Ray is the optional extra ``compressor[ray]``, imported only here. A cluster this process
starts is local and listens on 127.0.0.1 (the HTTP proxy on ``host``); Ray's own agents may
still bind the machine's interface address (docs/deploy.md says how to keep them off it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .batching import BatchSettings, DynamicBatcher
from .onnx_files import external_files
from .serve import HEADER_LENGTH, V2Protocol

APP = "compressor"
"""The Ray Serve application's name (its deployment is ``V2Replica``)."""
PROXY_CHECK_S = 60
"""How long the HTTP proxy of a cluster started here may take to answer a health check."""


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        msg = "--engine ray needs Ray Serve: pip install 'compressor[ray]'"
        raise UserError(msg) from None
    return ray, serve


class V2Replica:
    """One Ray Serve replica: the file in a `DynamicBatcher` behind `V2Protocol`."""

    def __init__(self, model: bytes, name: str, settings: dict[str, Any], pin: bool) -> None:
        from ray import serve

        context = serve.get_replica_context()
        rank = getattr(context, "rank", 0)  # a ReplicaRank in newer Ray, an int before
        rank = getattr(rank, "rank", rank) or 0
        threads = settings["threads"]
        self.cores = _pin(int(rank), threads) if pin else None
        self.folder = tempfile.mkdtemp(prefix="compressor-ray-")
        path = Path(self.folder) / "model.onnx"
        path.write_bytes(model)
        self.batcher = DynamicBatcher(path, BatchSettings(**settings))
        replica = f"{context.replica_id.unique_id}:{os.getpid()}"
        self.protocol = V2Protocol(self.batcher, name, replica=replica)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await request.body()
        reply = await self.protocol.handle(
            request.method, request.url.path, body, request.headers.get(HEADER_LENGTH)
        )
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.batcher.close()


def _pin(rank: int, threads: int) -> list[int] | None:
    """Pin this process's threads (and those it starts later) to the ``rank``-th slot of
    ``threads`` cores among the cores it may use; None when there are fewer than that."""
    cores = sorted(os.sched_getaffinity(0))
    slots = len(cores) // threads
    if slots < 1:
        return None
    chosen = cores[(rank % slots) * threads : (rank % slots + 1) * threads]
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), chosen)
    return chosen


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How many replicas: ``replicas`` (min, max; equal for a fixed count), the concurrent
    requests per replica it scales on (``scale_target``), and the cluster to join
    (``address``; None starts a local one)."""

    replicas: tuple[int, int] = (1, 1)
    scale_target: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        low, high = self.replicas
        if not 1 <= low <= high:
            msg = f"replicas must be 1 <= MIN <= MAX (got: {low}:{high})"
            raise UserError(msg)
        if self.scale_target is not None and self.scale_target < 1:
            msg = f"the scale target must be >= 1 (got: {self.scale_target})"
            raise UserError(msg)


def start(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    settings: BatchSettings | None = None,
    options: RayOptions | None = None,
) -> str:
    """Deploy ``path`` on Ray Serve and return the base URL once every replica is ready."""
    ray, serve = _ray()
    path, options = Path(path), options or RayOptions()
    settings = settings or BatchSettings()
    name = name or path.stem
    if not name or "/" in name:
        raise UserError(f"model name {name!r} must be non-empty and hold no '/'")
    if not 1 <= port <= 65535:
        raise UserError(f"--engine ray needs a port from 1 to 65535 (got: {port})")
    if path.suffix != ".onnx" or not path.is_file():
        raise UserError(f"no ONNX file at {str(path)!r}")
    if settings.sessions != 1:
        msg = (
            f"--engine ray runs one session per replica (got: {settings.sessions}); use --replicas"
        )
        raise UserError(msg)
    if external_files(path):
        msg = "--engine ray sends the file to its replicas; one with external tensor files "
        raise UserError(msg + "(a model over 2 GB) is not supported")
    try:  # a file the batcher cannot serve fails here, not in every replica
        DynamicBatcher(path, settings).close()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path} does not load in {settings.runtime}: {exc}") from None
    local = options.address is None
    cores = len(os.sched_getaffinity(0))
    if local and options.replicas[0] * settings.threads > cores:
        msg = (
            f"{options.replicas[0]} replica(s) x {settings.threads} thread(s) need more than the "
            f"{cores} cores here; give fewer --replicas or --threads"
        )
        raise UserError(msg)
    if not ray.is_initialized():
        if local:
            # a busy small machine can take longer than Ray Serve's 5-10 s to answer its
            # proxy's health checks, which then restarts the proxy over and over
            for key in (
                "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S",
                "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S",
            ):
                os.environ.setdefault(key, str(PROXY_CHECK_S))
            ray.init(
                include_dashboard=False,
                num_cpus=cores,
                log_to_driver=False,
                logging_level=logging.WARNING,
                _node_ip_address="127.0.0.1",
            )
        else:
            ray.init(address=options.address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    low, high = options.replicas
    scaling: dict[str, Any] = {"num_replicas": low}
    if high > low:
        target = options.scale_target or settings.max_batch
        scaling = {
            "autoscaling_config": {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": target,
            }
        }
    deployment = serve.deployment(
        V2Replica,
        ray_actor_options={"num_cpus": settings.threads},
        max_ongoing_requests=max(settings.max_queue, 2 * settings.max_batch),
        **scaling,
    )
    app = deployment.bind(path.read_bytes(), name, settings.to_dict(), local)
    serve.run(app, name=APP, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Take the application down and leave the Ray cluster (stopping one this process started)."""
    ray, serve = _ray()
    if not ray.is_initialized():  # never started (a bad argument): nothing to stop
        return
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def replica_actors() -> list[str]:
    """The names of the application's replica actors (in Ray's ``serve`` namespace)."""
    ray, _ = _ray()
    found = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"] for a in found if a["namespace"] == "serve" and f"{APP}#V2Replica" in a["name"]
    )


def serve_ray(
    path: str | Path,
    *,
    stop_after_s: float | None = None,
    on_ready: Callable[[str], None] | None = None,
    **deploy: Any,
) -> None:
    """`start`, then serve until Ctrl-C / SIGTERM (or ``stop_after_s`` seconds), then `stop`."""
    if stop_after_s is not None and stop_after_s <= 0:
        raise UserError(f"stop_after_s must be > 0 (got: {stop_after_s})")
    done = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: only the time limit
            previous[sig] = signal.signal(sig, lambda *_: done.set())
    try:
        url = start(path, **deploy)
        if on_ready:
            on_ready(url)
        done.wait(stop_after_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
