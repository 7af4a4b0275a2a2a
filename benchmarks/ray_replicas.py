"""Past one process: the artifact on Ray Serve replicas against `compressor serve`, under load.

The pruned + INT8 ResNet-18 of `load.py` (random weights, 224x224) behind three fronts, each
loaded over HTTP by `compressor.runtime.load.load_url` (closed-loop clients, binary tensors,
the same loader as `compressor load --url`):

- ``serve 1x{T}``: `compressor serve` in a child process, one session of all T threads;
- ``ray 1x{T}``: one Ray Serve replica of T threads;
- ``ray 2x{T/2}``: two replicas of T/2 threads each (pinned to their own cores).

Every front batches up to ``--max-batch`` rows for 2 ms. The whole comparison is repeated
``--runs`` times; each cell is the median over the runs. "On paper for N nodes": Ray Serve
spreads requests over replicas with no shared state, so N machines like this one with the
best replica setting give about N times its throughput at the same p99 (plus the proxy hop,
measured here in the ``ray 1x{T}`` row against ``serve 1x{T}``).

Ray's agents may bind the machine's interface address: run it in a network namespace of
its own, with only loopback (the script brings loopback up):

    unshare --net python benchmarks/ray_replicas.py              # levels 1 4 16, 3 runs

Prints a table and writes benchmarks/results/ray_replicas.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import print_table, write_results
from load import build
from ray_run import loopback_up

from compressor.runtime import ray_serve
from compressor.runtime.batching import BatchSettings
from compressor.runtime.load import load_url
from compressor.runtime.measure import default_threads


def wait_ready(url: str, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready")


def measure(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    found = load_url(
        url,
        "model",
        levels=args.levels,
        max_requests=args.requests,
        max_seconds=args.seconds,
        p99_ms=args.p99_ms,
    )
    return found["settings"][0]["levels"]


def serve_front(path: Path, threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "compressor", "serve", str(path), "--name", "model",
               "--port", "8124", "--threads", str(threads), "--max-batch", str(args.max_batch),
               "--stop-after-s", "600"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready("http://127.0.0.1:8124")
        return measure("http://127.0.0.1:8124", args)
    finally:
        process.terminate()
        process.wait(60)


def ray_front(
    path: Path, replicas: int, threads: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    settings = BatchSettings(max_batch=args.max_batch, max_wait_ms=2.0, threads=threads)
    url = ray_serve.start(
        path,
        port=8123,
        name="model",
        settings=settings,
        options=ray_serve.RayOptions(replicas=(replicas, replicas)),
    )
    try:
        return measure(url, args)
    finally:
        ray_serve.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    interfaces = loopback_up()
    if interfaces != ["lo"]:
        print(f"note: not in a network namespace of its own ({interfaces})", file=sys.stderr)
    half = max(1, args.threads // 2)
    fronts = {
        f"serve 1x{args.threads}": lambda p: serve_front(p, args.threads, args),
        f"ray 1x{args.threads}": lambda p: ray_front(p, 1, args.threads, args),
        f"ray 2x{half}": lambda p: ray_front(p, 2, half, args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.size, 0.5, args.threads, Path(tmp))["final"]
        runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in fronts}
        for run in range(args.runs):
            for name, front in fronts.items():
                print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
                runs[name].append(front(path))
    rows = []
    for name, measured in runs.items():
        for index, level in enumerate(args.levels):
            cells = [m[index] for m in measured]
            rows.append(
                {
                    "front": name,
                    "concurrency": level,
                    "throughput": _median([c.get("throughput") for c in cells]),
                    "p50_ms": _median([c["latency_ms"]["p50"] for c in cells if "latency_ms" in c]),
                    "p99_ms": _median([c["latency_ms"]["p99"] for c in cells if "latency_ms" in c]),
                    "errors": sum(c.get("errors", 0) for c in cells),
                    "throughput_runs": [c.get("throughput") for c in cells],
                }
            )
    print_table(
        rows,
        [
            ("front", "front"),
            ("clients", "concurrency"),
            ("req/s (median)", "throughput"),
            ("p50 ms", "p50_ms"),
            ("p99 ms", "p99_ms"),
            ("errors (all runs)", "errors"),
        ],
    )
    settings = {key: getattr(args, key) for key in ("levels", "runs", "requests", "seconds")}
    settings |= {"max_batch": args.max_batch, "size": args.size, "threads": args.threads}
    settings["cores"] = len(os.sched_getaffinity(0))
    write_results(args.out / "ray_replicas.json", settings, rows)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


if __name__ == "__main__":
    main()
