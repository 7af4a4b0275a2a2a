"""`compressor serve`: an ONNX file behind the Open Inference Protocol's REST form.

The KServe V2 / Triton HTTP protocol, so tritonclient's HTTP client, the KServe SDK and
curl work unchanged: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}`` (metadata), ``/v2/models/{name}/ready`` and
``POST /v2/models/{name}/infer`` with JSON tensors or Triton's binary tensor extension.
Requests go through the same `DynamicBatcher` as `compressor load`. Every error is a 4xx
or 5xx with the protocol's ``{"error": "..."}`` body; a full queue answers 503.

aiohttp serves it: one well-kept package that is both the asyncio HTTP server and its
graceful shutdown (in-flight requests finish), with no ASGI server to pair it with.
It is the optional extra ``compressor[serve]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .batching import DATATYPES, NUMPY_DTYPES, BadRequest, BatchSettings, Busy, DynamicBatcher

HEADER_LENGTH = "Inference-Header-Content-Length"


def _aiohttp() -> Any:
    try:
        from aiohttp import web
    except ImportError:
        msg = "compressor serve needs aiohttp: pip install 'compressor[serve]'"
        raise UserError(msg) from None
    return web


class _Invalid(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def max_body_bytes(batcher: DynamicBatcher) -> int:
    """The largest request body accepted: ``max_rows`` rows as JSON text (about 24 bytes a
    number) plus 64 KiB of JSON; larger bodies get HTTP 413."""
    numbers = 0
    for info in batcher.inputs:
        known = [d for d in info.shape[1:] if d > 0]
        unknown = sum(1 for d in info.shape[1:] if d <= 0)
        numbers += math.prod(known) * (512**unknown)
    rows = batcher.fixed_batch or batcher.settings.max_rows
    return rows * numbers * 24 + 65536


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, apart from the server that sends it."""

    status: int
    body: bytes
    headers: dict[str, str]


_MODEL_ROUTE = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$"
)


class V2Protocol:
    """The Open Inference Protocol's REST routes over one batcher, apart from the HTTP
    server that carries them (aiohttp in `serve`, Ray Serve in `compressor.runtime.ray_serve`):
    both call `handle` with the method, path, body and binary-header length of a request.

    ``on_answer`` is called after each infer request; ``replica`` (a Ray Serve replica's
    name) is added to each infer answer's ``parameters``."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        name: str,
        on_answer: Callable[[], None] | None = None,
        replica: str | None = None,
    ) -> None:
        from .._version import __version__

        self.batcher, self.name, self.on_answer, self.replica = batcher, name, on_answer, replica
        self.max_body = max_body_bytes(batcher)
        self.output_names = [o.name for o in batcher.outputs]
        self.server = {"name": "compressor", "version": __version__}
        self.metadata = {
            "name": name,
            "versions": ["1"],
            "platform": f"{batcher.settings.runtime}_onnx",
            "inputs": [i.to_dict() for i in batcher.inputs],
            "outputs": [o.to_dict() for o in batcher.outputs],
        }

    async def handle(
        self, method: str, path: str, body: bytes, header_length: str | None = None
    ) -> Reply:
        """The answer to one request (every error a 4xx or 5xx with ``{"error": ...}``)."""
        simple = {
            "/v2": {**self.server, "extensions": ["binary_tensor_data"]},
            "/v2/health/live": {"live": True},
            "/v2/health/ready": {"ready": True},
        }
        route = _MODEL_ROUTE.match(path)
        if path in simple or (route and route["rest"] != "/infer"):
            if method not in ("GET", "HEAD"):
                return _error(405, "Method Not Allowed")
            if path in simple:
                return _json(200, simple[path])
            try:
                self._model(route["name"], route["version"])
            except _Invalid as exc:
                return _error(exc.status, str(exc))
            if route["rest"] == "/ready":
                return _json(200, {"name": self.name, "ready": True})
            return _json(200, self.metadata)
        if route is None:
            return _error(404, "Not Found")
        if method != "POST":
            return _error(405, "Method Not Allowed")
        try:
            return await self._infer(route["name"], route["version"], body, header_length)
        finally:
            if self.on_answer:
                self.on_answer()

    def _model(self, asked: str, version: str | None) -> None:
        if asked != self.name or version not in (None, "1"):
            which = f"{asked!r}" + (f" version {version!r}" if version else "")
            raise _Invalid(404, f"unknown model {which}; this server has {self.name!r} version 1")

    async def _infer(
        self, asked: str, version: str | None, body: bytes, header_length: str | None
    ) -> Reply:
        try:
            self._model(asked, version)
            if len(body) > self.max_body:
                raise _Invalid(413, f"the body holds {len(body)} bytes; at most "
                               f"{self.max_body} are accepted")  # fmt: skip
            header, inputs, wanted = parse_request(body, header_length)
            unknown = sorted(set(wanted or ()) - {"*"} - set(self.output_names))
            if unknown:
                msg = f"unknown output(s) {unknown}; the model has {self.output_names}"
                raise _Invalid(400, msg)
            answer = await asyncio.wrap_future(self.batcher.submit(inputs))
        except _Invalid as exc:
            return _error(exc.status, str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))
        except Busy as exc:
            return _error(503, str(exc))
        except Exception as exc:  # the runtime refused it; the server goes on
            return _error(500, f"the model failed on this request: {exc}")
        return respond(header, answer, wanted, self.name, self.replica)


def _json(status: int, value: Any) -> Reply:
    return Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


def _error(status: int, message: str) -> Reply:
    return _json(status, {"error": message})


def make_app(batcher: DynamicBatcher, name: str, on_answer: Callable[[], None] | None = None):
    """The aiohttp application serving ``batcher`` under the model name ``name``."""
    web = _aiohttp()
    protocol = V2Protocol(batcher, name, on_answer)

    async def route(request):
        body = b""
        if request.method == "POST":
            if request.content_length is not None and request.content_length > protocol.max_body:
                return _send(web, _error(413, f"the body holds {request.content_length} bytes; "
                                         f"at most {protocol.max_body} are accepted"))  # fmt: skip
            try:
                body = await _read(request, protocol.max_body)
            except _Invalid as exc:
                return _send(web, _error(exc.status, str(exc)))
        reply = await protocol.handle(
            request.method, request.path, body, request.headers.get(HEADER_LENGTH)
        )
        return _send(web, reply)

    async def _read(request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise _Invalid(413, f"the body is over {limit} bytes, the most accepted")
            chunks.append(chunk)
        return b"".join(chunks)

    app = web.Application(client_max_size=protocol.max_body)
    app.add_routes([web.route("*", "/{tail:.*}", route)])
    return app


def _send(web: Any, reply: Reply):
    return web.Response(body=reply.body, status=reply.status, headers=reply.headers)


def parse_request(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, bool] | None]:
    """An infer request's JSON header, its input arrays, and the outputs asked for
    (name -> as binary; None: all, as JSON unless ``binary_data_output``)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise _Invalid(400, f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= size <= len(body):
            raise _Invalid(400, f"{HEADER_LENGTH} {size} is outside the body's {len(body)} bytes")
    else:
        size = len(body)
    try:
        header = json.loads(body[:size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(400, f"the request is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise _Invalid(400, 'the request must be a JSON object with an "inputs" list')
    binary, offset, inputs = body[size:], 0, {}
    for tensor in header["inputs"]:
        array, used = _tensor(tensor, binary, offset)
        offset += used
        inputs[tensor["name"]] = array
    if offset != len(binary):
        raise _Invalid(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return header, inputs, _wanted(header)


def _tensor(tensor: Any, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise _Invalid(400, 'every input must be an object with a "name"')
    name, shape, datatype = tensor["name"], tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _Invalid(400, f"input {name!r}: shape must be a list of integers >= 0")
    if datatype not in NUMPY_DTYPES:
        allowed = ", ".join(NUMPY_DTYPES)
        raise _Invalid(400, f"input {name!r}: datatype {datatype!r} is not one of {allowed}")
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    count = math.prod(shape)
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _Invalid(400, f"input {name!r}: parameters must be an object")
    if "binary_data_size" in parameters:
        nbytes = parameters["binary_data_size"]
        if not isinstance(nbytes, int) or nbytes < 0 or offset + nbytes > len(binary):
            raise _Invalid(400, f"input {name!r}: binary_data_size {nbytes!r} does not fit")
        if nbytes != count * dtype.itemsize:
            raise _Invalid(400, f"input {name!r}: {nbytes} bytes do not hold shape {shape} "
                           f"of {datatype}")  # fmt: skip
        data = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset).astype(dtype)
        return data.reshape(shape), nbytes
    if "data" not in tensor:
        raise _Invalid(400, f"input {name!r} has neither data nor binary_data_size")
    try:
        data = np.asarray(tensor["data"])
        if data.dtype.kind not in "biuf" or data.size != count:
            raise ValueError
        cast = data.astype(dtype)
        if dtype.kind in "iub" and not np.array_equal(cast, data):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise _Invalid(400, f"input {name!r}: data must be {count} {datatype} numbers "
                       f"(shape {shape})") from None  # fmt: skip
    return cast.reshape(shape), 0


def _wanted(header: dict[str, Any]) -> dict[str, bool] | None:
    outputs = header.get("outputs")
    parameters = header.get("parameters") or {}
    default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    if outputs is None:
        return None if not default else {"*": True}
    if not isinstance(outputs, list):
        raise _Invalid(400, '"outputs" must be a list of {"name": ...} objects')
    wanted = {}
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise _Invalid(400, 'every requested output must be an object with a "name"')
        p = out.get("parameters") or {}
        wanted[out["name"]] = bool(p.get("binary_data", default) if isinstance(p, dict) else 0)
    return wanted


def respond(
    header: dict[str, Any], answer: Any, wanted: dict | None, name: str, replica: str | None = None
) -> Reply:
    """The protocol's infer response for ``answer`` (binary outputs after the JSON)."""
    names = list(answer.outputs)
    if wanted is not None and "*" not in wanted:
        names = [n for n in names if n in wanted]
    outputs, blobs = [], []
    for out in names:
        array = answer.outputs[out]
        tensor: dict[str, Any] = {
            "name": out,
            "datatype": DATATYPES[array.dtype],
            "shape": list(array.shape),
        }
        if wanted is not None and wanted.get(out, wanted.get("*", False)):
            blob = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": outputs}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    body["parameters"] = {
        "queue_us": round(answer.queue_ms * 1000),
        "compute_us": round(answer.run_ms * 1000),
        "batch_rows": answer.batch_rows,
    }
    if replica:
        body["parameters"]["replica"] = replica
    text = json.dumps(body).encode()
    if not blobs:
        return Reply(200, text, {"Content-Type": "application/json"})
    return Reply(
        200,
        text + b"".join(blobs),
        {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"},
    )


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    settings: BatchSettings | None = None,
    stop_after_requests: int | None = None,
    stop_after_s: float | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Serve ``path`` until Ctrl-C / SIGTERM (or ``stop_after_requests`` infer requests, or
    ``stop_after_s`` seconds), then finish the requests in flight; returns the answers given.

    ``on_ready`` gets the base URL once the server listens (``port=0``: any free port).
    """
    path = Path(path)
    name = name or path.stem
    if not name or "/" in name:
        msg = f"model name {name!r} must be non-empty and hold no '/'"
        raise UserError(msg)
    if not 0 <= port <= 65535:
        msg = f"port must be from 0 to 65535 (got: {port})"
        raise UserError(msg)
    limits = {"stop_after_requests": stop_after_requests, "stop_after_s": stop_after_s}
    for what, value in limits.items():
        if value is not None and value <= 0:
            msg = f"{what} must be > 0 (got: {value})"
            raise UserError(msg)
    _aiohttp()
    with DynamicBatcher(path, settings) as batcher:
        return asyncio.run(
            _serve(batcher, host, port, name, stop_after_requests, stop_after_s, on_ready)
        )


async def _serve(batcher, host, port, name, stop_after_requests, stop_after_s, on_ready) -> int:
    web = _aiohttp()
    stop = asyncio.Event()
    answered = 0

    def on_answer() -> None:
        nonlocal answered
        answered += 1
        if stop_after_requests and answered >= stop_after_requests:
            stop.set()

    runner = web.AppRunner(
        make_app(batcher, name, on_answer), handle_signals=False, shutdown_timeout=30.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            msg = f"cannot listen on {host}:{port}: {exc.strerror}"
            raise UserError(msg) from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # not in the main thread (or on Windows): the other limits stop it
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        bound_host, bound_port = runner.addresses[0][:2]
        if on_ready:
            on_ready(f"http://{bound_host}:{bound_port}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), stop_after_s)
    finally:
        await runner.cleanup()  # stops listening, then lets requests in flight finish
    return answered
