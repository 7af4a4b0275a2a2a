"""Ray Serve under load, for tests/test_ray_serve.py: run it in a network namespace of its own
with only loopback up, so that nothing Ray starts listens anywhere else.

    unshare --net python tests/ray_run.py RESULT.json      # it brings loopback up itself

A two-input ONNX file (float32 and int64) on 2 replicas of one thread each, batching up to 8
rows for 2 ms. tritonclient's HTTP client sends 16 concurrent streams of requests and each
answer is compared with ONNX Runtime's own; bad requests are sent; then `compressor load
--url`'s loader runs 16 clients while one replica's process is killed, and afterwards the
replica count and the answers are checked again. Everything stops by itself (bounded
request counts and time limits). Writes what it saw to RESULT.json.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from conftest import two_input_model

from compressor.runtime import ray_serve
from compressor.runtime.batching import BatchSettings
from compressor.runtime.load import load_url

PORT = 8123


def rows(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, (n, 3)).astype(np.int64),
    }


def triton_stream(url: str, path: Path, stream: int, requests: int) -> dict:
    """One client's requests through tritonclient, each answer against ONNX Runtime's."""
    import tritonclient.http as httpclient

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    mismatches, replicas = 0, []
    try:
        for i in range(requests):
            feeds = rows(1 + (stream + i) % 4, seed=1000 * stream + i)
            tensors = []
            for name, array in feeds.items():
                tensor = httpclient.InferInput(name, list(array.shape), "FP32" if
                                               array.dtype == np.float32 else "INT64")  # fmt: skip
                tensor.set_data_from_numpy(array, binary_data=bool(i % 2))
                tensors.append(tensor)
            result = client.infer("two", tensors)
            expected = session.run(None, feeds)[0]
            mismatches += not np.allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-5)
            replicas.append(result.get_response()["parameters"]["replica"])
    finally:
        client.close()
    return {"mismatches": mismatches, "replicas": replicas}


def status_of(url: str, body: dict | None, route: str = "/v2/models/two/infer") -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + route, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.5)
    return False


def loopback_up() -> list[str]:
    """Bring ``lo`` up (a new network namespace starts with it down); the interfaces here."""
    get_flags, set_flags, up = 0x8913, 0x8914, 0x1  # SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, get_flags, request))[1]
        if not flags & up:
            fcntl.ioctl(sock, set_flags, struct.pack("16sH22x", b"lo", flags | up))
    return sorted(name for _, name in socket.if_nameindex())


def main() -> int:
    out = Path(sys.argv[1])
    result: dict = {"interfaces": loopback_up()}
    folder = Path(tempfile.mkdtemp())
    path = two_input_model(folder / "two.onnx")
    settings = BatchSettings(max_batch=8, max_wait_ms=2.0, threads=1)
    started = time.monotonic()
    url = ray_serve.start(
        path, port=PORT, settings=settings, options=ray_serve.RayOptions(replicas=(2, 2))
    )
    try:
        import ray

        result["start_s"] = round(time.monotonic() - started, 1)
        result["replicas_before"] = ray_serve.replica_actors()
        with ThreadPoolExecutor(16) as pool:
            streams = list(pool.map(lambda s: triton_stream(url, path, s, 12), range(16)))
        result["triton"] = {
            "requests": sum(len(s["replicas"]) for s in streams),
            "mismatches": sum(s["mismatches"] for s in streams),
            "replicas_seen": sorted({r for s in streams for r in s["replicas"]}),
        }
        good = {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
            ]
        }
        wrong_type = json.loads(json.dumps(good))
        wrong_type["inputs"][1]["datatype"] = "FP32"
        result["statuses"] = {
            "good": status_of(url, good),
            "wrong_dtype": status_of(url, wrong_type),
            "missing_input": status_of(url, {"inputs": good["inputs"][:1]}),
            "wrong_method": status_of(url, None, "/v2/models/two/infer"),
            "unknown_model": status_of(url, None, "/v2/models/other"),
            "live": status_of(url, None, "/v2/health/live"),
        }
        # the load test with 16 clients; one replica's process is killed 2 s in
        killed: list[str] = []

        def kill() -> None:
            time.sleep(2.0)
            name = ray_serve.replica_actors()[0]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed.append(name)

        killer = threading.Thread(target=kill)
        killer.start()
        load = load_url(url, "two", levels=(16,), max_requests=100_000, max_seconds=8.0)
        killer.join()
        level = load["settings"][0]["levels"][0]
        result["load"] = {
            "killed": killed,
            "requests": level.get("requests"),
            "errors": level.get("errors"),
            "first_error": level.get("first_error"),
            "throughput": level.get("throughput"),
        }
        back = wait_for(
            lambda: len(ray_serve.replica_actors()) == 2 and killed[0] not in ray_serve.replica_actors(),
            90,
        )  # fmt: skip
        result["replicas_after"] = ray_serve.replica_actors() if back else []
        with ThreadPoolExecutor(8) as pool:
            after = list(pool.map(lambda s: triton_stream(url, path, 100 + s, 8), range(8)))
        result["after_restart"] = {
            "requests": sum(len(s["replicas"]) for s in after),
            "mismatches": sum(s["mismatches"] for s in after),
            "replicas_seen": sorted({r for s in after for r in s["replicas"]}),
        }
    finally:
        ray_serve.stop()
    result["total_s"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
