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
import signal
from collections.abc import Callable
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


def make_app(batcher: DynamicBatcher, name: str, on_answer: Callable[[], None] | None = None):
    """The aiohttp application serving ``batcher`` under the model name ``name``."""
    web = _aiohttp()
    from .._version import __version__

    max_body = max_body_bytes(batcher)
    output_names = [o.name for o in batcher.outputs]
    metadata = {
        "name": name,
        "versions": ["1"],
        "platform": f"{batcher.settings.runtime}_onnx",
        "inputs": [i.to_dict() for i in batcher.inputs],
        "outputs": [o.to_dict() for o in batcher.outputs],
    }

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    @web.middleware
    async def protocol_errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason)

    def model(request) -> None:
        asked = request.match_info["name"]
        version = request.match_info.get("version")
        if asked != name or version not in (None, "1"):
            which = f"{asked!r}" + (f" version {version!r}" if version else "")
            raise _Invalid(404, f"unknown model {which}; this server has {name!r} version 1")

    async def server_metadata(request):
        return web.json_response(
            {"name": "compressor", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def live(request):
        return web.json_response({"live": True})

    async def ready(request):
        return web.json_response({"ready": True})

    async def model_metadata(request):
        try:
            model(request)
        except _Invalid as exc:
            return error(exc.status, str(exc))
        return web.json_response(metadata)

    async def model_ready(request):
        try:
            model(request)
        except _Invalid as exc:
            return error(exc.status, str(exc))
        return web.json_response({"name": name, "ready": True})

    async def infer(request):
        try:
            model(request)
            if request.content_length is not None and request.content_length > max_body:
                raise _Invalid(413, f"the body holds {request.content_length} bytes; at most "
                               f"{max_body} are accepted")  # fmt: skip
            body = await _read(request, max_body)
            header, inputs, wanted = parse_request(body, request.headers.get(HEADER_LENGTH))
            unknown = sorted(set(wanted or ()) - {"*"} - set(output_names))
            if unknown:
                raise _Invalid(400, f"unknown output(s) {unknown}; the model has {output_names}")
            answer = await asyncio.wrap_future(batcher.submit(inputs))
        except _Invalid as exc:
            return error(exc.status, str(exc))
        except BadRequest as exc:
            return error(400, str(exc))
        except Busy as exc:
            return error(503, str(exc))
        except Exception as exc:  # the runtime refused it; the server goes on
            return error(500, f"the model failed on this request: {exc}")
        finally:
            if on_answer:
                on_answer()
        return respond(web, header, answer, wanted, name)

    async def _read(request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise _Invalid(413, f"the body is over {limit} bytes, the most accepted")
            chunks.append(chunk)
        return b"".join(chunks)

    app = web.Application(middlewares=[protocol_errors], client_max_size=max_body)
    app.add_routes(
        [
            web.get("/v2", server_metadata),
            web.get("/v2/health/live", live),
            web.get("/v2/health/ready", ready),
            web.get("/v2/models/{name}", model_metadata),
            web.get("/v2/models/{name}/versions/{version}", model_metadata),
            web.get("/v2/models/{name}/ready", model_ready),
            web.get("/v2/models/{name}/versions/{version}/ready", model_ready),
            web.post("/v2/models/{name}/infer", infer),
            web.post("/v2/models/{name}/versions/{version}/infer", infer),
        ]
    )
    return app


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


def respond(web: Any, header: dict[str, Any], answer: Any, wanted: dict | None, name: str):
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
    text = json.dumps(body).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=text + b"".join(blobs),
        headers={HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"},
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
