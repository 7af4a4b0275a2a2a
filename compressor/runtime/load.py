"""Closed-loop load tests: what an ONNX file does under concurrent requests.

N clients each send one request at a time and wait for its answer, as Triton's
perf_analyzer does, at each concurrency level, bounded in requests and seconds. The
clients talk to a `DynamicBatcher` in this process (`load_file`) or to a server over HTTP
(`http_client`). Per level: throughput, p50/p90/p95/p99 latency, rows per run, queue time
against run time, and the throughput a queueing estimate expects (sessions x rows per run
/ run time), with a note where the two differ.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import UserError
from .batching import DATATYPES, NUMPY_DTYPES, BatchSettings, DynamicBatcher, TensorInfo
from .measure import default_threads

LEVELS = (1, 2, 4, 8, 16, 32, 64)
"""The default concurrency levels."""

Call = Callable[[Mapping[str, np.ndarray]], dict[str, float]]
"""One client's call: sends a request, waits, returns ``queue_ms``, ``run_ms`` and
``batch_rows`` (an empty dict when the server does not say)."""


def default_settings(
    threads: int | None = None,
    max_batch: int = 32,
    runtimes: Sequence[str] = ("onnxruntime",),
) -> list[BatchSettings]:
    """The settings a load test compares, in each of ``runtimes``: one session with all
    cores and one session per core, each without batching and with a dynamic batcher
    (``max_batch``, 2 ms wait)."""
    cores = threads or default_threads()
    splits = [(1, cores)] + ([(cores, 1)] if cores > 1 else [])
    return [
        BatchSettings(
            max_batch=b, max_wait_ms=w, sessions=s, threads=t, max_queue=1024, runtime=runtime
        )
        for runtime in dict.fromkeys(runtimes)
        for s, t in splits
        for b, w in ((1, 0.0), (max_batch, 2.0))
    ]


def sample_inputs(
    inputs: Sequence[TensorInfo], shape: Sequence[int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """One seeded row per input (float: normal, integer: zeros, e.g. valid token ids).

    ``shape`` (without the batch axis) fills the sizes the file leaves dynamic.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for info in inputs:
        dims = list(info.shape[1:])
        if -1 in dims:
            if shape is None or len(shape) != len(dims):
                msg = (
                    f"input {info.name!r} has dynamic shape {list(info.shape)}: give the shape "
                    f"without the batch axis (--input-shape), {len(dims)} numbers"
                )
                raise UserError(msg)
            dims = [int(d) for d in shape]
        dtype = NUMPY_DTYPES[info.datatype]
        if np.issubdtype(dtype, np.floating):
            out[info.name] = rng.standard_normal((1, *dims)).astype(dtype)
        else:
            out[info.name] = np.zeros((1, *dims), dtype)
    return out


def run_level(
    make_call: Callable[[], Call],
    inputs: Mapping[str, np.ndarray],
    concurrency: int,
    *,
    max_requests: int,
    max_seconds: float,
    sessions: int = 1,
) -> dict[str, Any]:
    """``concurrency`` clients, each with its own call from ``make_call``, until
    ``max_requests`` answers or ``max_seconds``; the level's numbers."""
    counter = itertools.count()
    records: list[tuple[float, dict[str, float]]] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + max_seconds

    def client() -> None:
        call = make_call()
        while next(counter) < max_requests and time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                timing = call(inputs)
            except Exception as exc:  # counted and shown; the load goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latency = (time.perf_counter() - sent) * 1000
            with lock:
                records.append((latency, timing))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return _summarize(concurrency, records, errors, seconds, sessions)


def _summarize(
    concurrency: int,
    records: list[tuple[float, dict[str, float]]],
    errors: list[str],
    seconds: float,
    sessions: int,
) -> dict[str, Any]:
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(errors),
        "seconds": round(seconds, 6),
    }
    if errors:
        level["first_error"] = errors[0]
    if not records:
        return level
    latency = np.array([r[0] for r in records])
    throughput = len(records) / seconds
    level["throughput"] = round(throughput, 2)
    level["latency_ms"] = {
        f"p{q}": round(float(np.percentile(latency, q)), 3) for q in (50, 90, 95, 99)
    }
    timed = [r[1] for r in records if r[1]]  # a server may not say where the time went
    estimate = None
    level.update(mean_batch=None, queue_ms=None, run_ms=None, estimate=None)
    if timed:
        rows_per_run = np.array([max(t["batch_rows"], 1) for t in timed])
        run_ms = np.array([t["run_ms"] for t in timed])
        runs = float(np.sum(1 / rows_per_run))  # each request is 1/B of its run
        busy_ms = float(np.sum(run_ms / rows_per_run))
        estimate = sessions * len(timed) / (busy_ms / 1000) if busy_ms > 0 else None
        level.update(
            mean_batch=round(len(timed) / runs, 2),
            queue_ms=round(float(np.mean([t["queue_ms"] for t in timed])), 3),
            run_ms=round(float(np.mean(run_ms)), 3),
            estimate=None if estimate is None else round(estimate, 2),
        )
    level["note"] = _estimate_note(throughput, estimate)
    return level


def _estimate_note(throughput: float, estimate: float | None) -> str | None:
    """Where the measured throughput and the queueing estimate differ, and why."""
    if not estimate:
        return None
    ratio = throughput / estimate
    if ratio < 0.8:
        return (
            f"{ratio:.0%} of the estimate: the sessions were idle {1 - ratio:.0%} of the time "
            "(waiting for a batch to fill, too few clients, or time outside the runtime)"
        )
    if ratio > 1.1:
        return (
            f"{ratio:.0%} of the estimate: runs overlapped more than the sessions' count "
            "suggests (sessions shared the cores, so each run took longer than it would alone)"
        )
    return None


def batcher_client(batcher: DynamicBatcher) -> Callable[[], Call]:
    """Clients that call ``batcher`` in this process."""

    def make_call() -> Call:
        def call(inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
            answer = batcher.run(inputs)
            return {
                "queue_ms": answer.queue_ms,
                "run_ms": answer.run_ms,
                "batch_rows": answer.batch_rows,
            }

        return call

    return make_call


def http_client(url: str, model: str, binary: bool = True) -> Callable[[], Call]:
    """Clients that POST to ``url``'s ``/v2/models/{model}/infer`` (one connection each);
    ``binary`` sends the tensors with the protocol's binary extension instead of JSON lists."""
    import http.client

    parts = urlsplit(_check_url(url))
    path = f"/v2/models/{model}/infer"

    def make_call() -> Call:
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)

        def call(inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
            body, headers = encode_request(inputs, binary)
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                msg = f"HTTP {response.status}: {data[:200].decode(errors='replace')}"
                raise RuntimeError(msg)
            size = response.getheader("Inference-Header-Content-Length")
            header = json.loads(data[: int(size)] if size else data)
            p = header.get("parameters") or {}
            if not all(k in p for k in ("queue_us", "compute_us", "batch_rows")):
                return {}  # another server: latency and throughput only
            return {
                "queue_ms": p["queue_us"] / 1000,
                "run_ms": p["compute_us"] / 1000,
                "batch_rows": p["batch_rows"],
            }

        return call

    return make_call


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        msg = f"the server URL must look like http://HOST:PORT (got: {url!r})"
        raise UserError(msg)
    return url


def encode_request(inputs: Mapping[str, np.ndarray], binary: bool) -> tuple[bytes, dict]:
    """An Open Inference Protocol infer request for ``inputs`` (body, headers)."""
    tensors, blobs = [], []
    for name, array in inputs.items():
        tensor: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": DATATYPES[array.dtype],
        }
        if binary:
            blob = np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    header = json.dumps({"inputs": tensors}).encode()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
    return header + b"".join(blobs), headers


def load_url(
    url: str,
    model: str,
    *,
    levels: Sequence[int] = LEVELS,
    max_requests: int = 400,
    max_seconds: float = 5.0,
    input_shape: Sequence[int] | None = None,
    sessions: int = 1,
    p99_ms: float = 50.0,
    binary: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load-test a running `compressor serve` (or any Open Inference Protocol server) over
    HTTP; the inputs follow the model's metadata. ``sessions`` (the server's) only feeds the
    queueing estimate."""
    import urllib.error
    import urllib.request

    levels = _check_levels(levels)
    base = _check_url(url).rstrip("/")
    try:  # an http:// URL, checked above
        with urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=30) as response:  # noqa: S310
            meta = json.loads(response.read())
    except (urllib.error.URLError, ValueError) as exc:
        msg = f"cannot read the metadata of model {model!r} at {base}: {exc}"
        raise UserError(msg) from None
    infos = [TensorInfo(i["name"], i["datatype"], tuple(i["shape"])) for i in meta["inputs"]]
    inputs = sample_inputs(infos, input_shape)
    make_call = http_client(base, model, binary)
    run_level(make_call, inputs, min(max(levels), 8), max_requests=16, max_seconds=max_seconds)
    label = f"HTTP {base} ({'binary' if binary else 'JSON'} tensors)"
    entry: dict[str, Any] = {"label": label, "url": base}
    entry["levels"] = _run_levels(
        make_call, inputs, levels, max_requests, max_seconds, sessions, progress, f"{model} {label}"
    )
    result = {"file": model, "p99_ms": p99_ms, "settings": [entry]}
    result["best"] = best_setting(result["settings"], p99_ms)
    return result


def load_file(
    path: str | Path,
    *,
    settings: Sequence[BatchSettings] | None = None,
    levels: Sequence[int] = LEVELS,
    max_requests: int = 400,
    max_seconds: float = 5.0,
    input_shape: Sequence[int] | None = None,
    p99_ms: float = 50.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load-test one ONNX file in this process under each of ``settings`` (default:
    `default_settings`) at each concurrency level; the best setting is the one with the
    highest throughput at a p99 latency within ``p99_ms``."""
    levels = _check_levels(levels)
    if max_requests < 1 or max_seconds <= 0:
        msg = f"max_requests and max_seconds must be > 0 (got: {max_requests}, {max_seconds})"
        raise UserError(msg)
    result: dict[str, Any] = {"file": str(path), "p99_ms": p99_ms, "settings": []}
    for setting in settings or default_settings():
        with DynamicBatcher(path, setting) as batcher:
            inputs = sample_inputs(batcher.inputs, input_shape)
            if batcher.fixed_batch and batcher.fixed_batch > 1:
                inputs = {k: np.repeat(v, batcher.fixed_batch, 0) for k, v in inputs.items()}
            make_call = batcher_client(batcher)
            # warm-up: every session runs a full batch before anything is timed
            run_level(
                make_call,
                inputs,
                min(max(levels), batcher.max_batch * setting.sessions),
                max_requests=2 * batcher.max_batch * setting.sessions,
                max_seconds=max_seconds,
            )
            entry = {"label": setting.label, **setting.to_dict()}
            if batcher.note:
                entry["note"] = batcher.note
            entry["levels"] = _run_levels(
                make_call,
                inputs,
                levels,
                max_requests,
                max_seconds,
                setting.sessions,
                progress,
                f"{Path(path).name} {setting.label}",
            )
            entry["best"] = best_setting([entry], p99_ms)
            result["settings"].append(entry)
            if batcher.fixed_batch:
                break  # no other setting batches a file whose batch size is fixed
    result["best"] = best_setting(result["settings"], p99_ms)
    return result


def _run_levels(
    make_call: Callable[[], Call],
    inputs: Mapping[str, np.ndarray],
    levels: Sequence[int],
    max_requests: int,
    max_seconds: float,
    sessions: int,
    progress: Callable[[str], None] | None,
    what: str,
) -> list[dict[str, Any]]:
    """`run_level` at each of ``levels``, reporting each as ``what: ...`` to ``progress``."""
    results = []
    for n in levels:
        level = run_level(
            make_call, inputs, n, max_requests=max_requests, max_seconds=max_seconds,
            sessions=sessions,
        )  # fmt: skip
        results.append(level)
        if progress:
            progress(f"{what}: {level_line(level)}")
    return results


def _check_levels(levels: Sequence[int]) -> list[int]:
    levels = [int(n) for n in levels]
    if not levels or min(levels) < 1 or max(levels) > 1024:
        msg = f"concurrency levels must be from 1 to 1024 (got: {list(levels)})"
        raise UserError(msg)
    return levels


def best_setting(settings: Sequence[Mapping[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The (setting, level) with the highest throughput whose p99 is within ``p99_ms``."""
    best = None
    for entry in settings:
        for level in entry["levels"]:
            ok = "throughput" in level and level["latency_ms"]["p99"] <= p99_ms
            if ok and (best is None or level["throughput"] > best["throughput"]):
                best = {
                    "label": entry["label"],
                    "concurrency": level["concurrency"],
                    "throughput": level["throughput"],
                    "p99_ms": level["latency_ms"]["p99"],
                }
    return best


def level_line(level: Mapping[str, Any]) -> str:
    """One level as a short line of text."""
    if "throughput" not in level:
        return f"concurrency {level['concurrency']}: no answer ({level.get('first_error')})"
    lat = level["latency_ms"]
    rows = level.get("mean_batch")
    return (
        f"concurrency {level['concurrency']}: {level['throughput']:.1f}/s, "
        f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} ms"
        + (f", {rows:.1f} rows/run" if rows is not None else "")
    )


def table(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table over every file, setting and level."""
    header = [
        "file",
        "setting",
        "clients",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "rows/run",
        "queue ms",
        "run ms",
        "estimate req/s",
        "errors",
    ]
    body = []
    for result in results:
        for entry in result["settings"]:
            for level in entry["levels"]:
                lat = level.get("latency_ms") or {}
                body.append(
                    [
                        Path(result["file"]).name,
                        entry["label"],
                        str(level["concurrency"]),
                        _num(level.get("throughput"), ".1f"),
                        *[_num(lat.get(f"p{q}"), ".2f") for q in (50, 90, 95, 99)],
                        _num(level.get("mean_batch"), ".1f"),
                        _num(level.get("queue_ms"), ".2f"),
                        _num(level.get("run_ms"), ".2f"),
                        _num(level.get("estimate"), ".1f"),
                        str(level["errors"]),
                    ]
                )
    return header, body


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The results as a Markdown table, each file's best setting and the estimate notes."""
    header, body = table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    for result in results:
        best = result.get("best")
        name = Path(result["file"]).name
        if best:
            lines.append(
                f"\n{name}: best within p99 {result['p99_ms']:g} ms: {best['label']} at "
                f"{best['concurrency']} clients, {best['throughput']:.1f} requests/s "
                f"(p99 {best['p99_ms']:.2f} ms)"
            )
        else:
            lines.append(f"\n{name}: no setting kept p99 within {result['p99_ms']:g} ms")
        for entry in result["settings"]:
            if entry.get("note"):
                lines.append(f"- {entry['note']}")
            for level in entry["levels"]:
                if level.get("note"):
                    n = level["concurrency"]
                    lines.append(f"- {entry['label']}, {n} client{'s' * (n != 1)}: {level['note']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class LoadTest:
    """The load test a pipeline run adds to its report (``Pipeline.run(load_test=...)``).

    The FP32 baseline file and the final artifact each run under `default_settings`
    (``max_batch``) at each of ``levels`` clients, each level bounded by ``max_requests``
    and ``max_seconds``; the best setting is the fastest with a p99 within ``p99_ms``.
    """

    levels: tuple[int, ...] = (1, 4, 16, 64)
    max_requests: int = 300
    max_seconds: float = 2.0
    max_batch: int = 32
    p99_ms: float = 50.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(_check_levels(self.levels)))
        for name in ("max_requests", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"LoadTest {name} must be an integer >= 1 (got: {value!r})"
                raise UserError(msg)
        for name in ("max_seconds", "p99_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                msg = f"LoadTest {name} must be a number > 0 (got: {value!r})"
                raise UserError(msg)

    def run(
        self,
        files: Mapping[str, str | Path],
        threads: int,
        progress: Callable[[str], None] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Load-test each of ``files`` (role -> path, e.g. ``baseline`` and ``final``);
        the report's ``load`` section. ``input_shape`` (without the batch axis) fills the
        sizes the files leave dynamic (a text model's sequence length)."""
        settings = default_settings(threads, self.max_batch)
        section: dict[str, Any] = {"p99_ms": self.p99_ms, "threads": threads, "files": {}}
        for role, path in files.items():
            result = load_file(
                path,
                settings=settings,
                levels=self.levels,
                max_requests=self.max_requests,
                max_seconds=self.max_seconds,
                p99_ms=self.p99_ms,
                progress=progress,
                input_shape=input_shape,
            )
            result["file"] = Path(path).name
            section["files"][role] = result
        return section
