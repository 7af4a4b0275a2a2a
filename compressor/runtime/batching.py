"""A dynamic batcher in front of ONNX Runtime (or OpenVINO) sessions, shared by
`compressor load` and `compressor serve`.

Requests wait in one bounded queue. Each worker owns one ONNX Runtime session and takes
the oldest request, then more until the batch holds ``max_batch`` rows or the oldest
request has waited ``max_wait_ms`` (the two knobs of Triton's dynamic batcher), runs
them as one batch and gives each request its own rows back. A full queue answers
`Busy` at once instead of growing without end.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .measure import openvino_model, ort_session
from .runtimes import check_runtimes

V2_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
"""ONNX Runtime's tensor types and their names in the Open Inference Protocol."""

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
"""A numpy dtype's name in the Open Inference Protocol (the inverse of `NUMPY_DTYPES`)."""


class Busy(UserError):
    """The request queue is full; the caller should retry later (HTTP 503)."""


class BadRequest(UserError):
    """A request whose tensors do not fit the model (HTTP 400)."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of the model: its name, protocol datatype and shape (-1: any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _tensor_info(arg: Any) -> TensorInfo:
    if arg.type not in V2_DATATYPES:
        msg = f"tensor {arg.name!r} has type {arg.type}, which the batcher does not serve"
        raise UserError(msg)
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorInfo(arg.name, V2_DATATYPES[arg.type], shape)


def file_io(path: str | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The inputs and outputs of the ONNX file ``path`` as ONNX Runtime reads them."""
    session = ort_session(path, 1)
    return (
        [_tensor_info(a) for a in session.get_inputs()],
        [_tensor_info(a) for a in session.get_outputs()],
    )


@dataclass
class Answer:
    """What one request gets back: its rows of every output, and where its time went."""

    outputs: dict[str, np.ndarray]
    queue_ms: float
    run_ms: float
    batch_rows: int


@dataclass
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int
    future: Future
    arrived: float = field(default_factory=time.perf_counter)

    def fits(self, other: _Request) -> bool:
        """Whether the two can run in one batch (equal shapes past the batch axis)."""
        return all(a.shape[1:] == other.inputs[k].shape[1:] for k, a in self.inputs.items())


_STOP = object()


@dataclass(frozen=True)
class BatchSettings:
    """How requests are run: up to ``max_batch`` rows per run, waiting at most
    ``max_wait_ms`` for more, on ``sessions`` sessions of ``threads`` intra-op threads in
    ``runtime`` (``onnxruntime`` or ``openvino``, with the report's settings for each); at
    most ``max_queue`` requests wait, and one request holds at most ``max_rows`` rows."""

    max_batch: int = 1
    max_wait_ms: float = 0.0
    sessions: int = 1
    threads: int = 1
    max_queue: int = 256
    max_rows: int = 64
    runtime: str = "onnxruntime"

    def __post_init__(self) -> None:
        check_runtimes([self.runtime])  # a clear error for an unknown or missing runtime
        for name in ("max_batch", "sessions", "threads", "max_queue", "max_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be an integer >= 1 (got: {value!r})"
                raise UserError(msg)
        if not isinstance(self.max_wait_ms, int | float) or not 0 <= self.max_wait_ms <= 10_000:
            msg = f"max_wait_ms must be a number from 0 to 10000 (got: {self.max_wait_ms!r})"
            raise UserError(msg)

    @property
    def label(self) -> str:
        batching = (
            "no batching"
            if self.max_batch == 1
            else f"batch<={self.max_batch} wait<={self.max_wait_ms:g}ms"
        )
        where = "" if self.runtime == "onnxruntime" else f"{self.runtime}, "
        return f"{where}{self.sessions}x{self.threads} threads, {batching}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _ORTSession:
    """An ONNX Runtime session with the report's settings; ``run`` gives every output."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads)
        self.inputs = [_tensor_info(a) for a in self.session.get_inputs()]
        self.outputs = [_tensor_info(a) for a in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


_OPENVINO_TYPES = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
}


class _OpenVINOSession:
    """An OpenVINO compiled model and one infer request, with the report's settings."""

    def __init__(self, path: Path, threads: int) -> None:
        self.compiled = openvino_model(path, threads)
        self.request = self.compiled.create_infer_request()
        self.inputs = [self._info(p) for p in self.compiled.inputs]
        self.outputs = [self._info(p) for p in self.compiled.outputs]

    @staticmethod
    def _info(port: Any) -> TensorInfo:
        kind, name = port.get_element_type().to_string(), port.get_any_name()
        if kind not in _OPENVINO_TYPES:
            msg = f"tensor {name!r} has type {kind}, which the batcher does not serve"
            raise UserError(msg)
        shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        return TensorInfo(name, _OPENVINO_TYPES[kind], shape)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        # the request reuses its output memory: copy before the next run
        return [np.array(result[port]) for port in self.compiled.outputs]


class DynamicBatcher:
    """Runs an ONNX file for concurrent requests, batching them (see the module docstring).

    `submit` is thread-safe and returns a `concurrent.futures.Future` of an `Answer`
    (``await asyncio.wrap_future(...)`` from asyncio). Use as a context manager, or call
    `close`, which finishes every request already queued.
    """

    def __init__(self, path: str | Path, settings: BatchSettings | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"ONNX file {str(self.path)!r} does not exist"
            raise UserError(msg)
        self.settings = settings or BatchSettings()
        make = _OpenVINOSession if self.settings.runtime == "openvino" else _ORTSession
        self._sessions = [
            make(self.path, self.settings.threads) for _ in range(self.settings.sessions)
        ]
        first = self._sessions[0]
        self.inputs, self.outputs = first.inputs, first.outputs
        batch_dims = {i.shape[0] if i.shape else 1 for i in self.inputs}
        self.fixed_batch = max(batch_dims) if -1 not in batch_dims else None
        """The batch size the file fixes (requests must have exactly that many rows), or None."""
        self.note = (
            None
            if self.fixed_batch is None
            else f"{self.path.name} fixes its batch size at {self.fixed_batch}: every request "
            f"runs alone, with exactly {self.fixed_batch} row(s)"
        )
        self._queue: queue.Queue = queue.Queue(maxsize=self.settings.max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, args=(s,), daemon=True, name=f"batcher-{i}")
            for i, s in enumerate(self._sessions)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def max_batch(self) -> int:
        return self.fixed_batch or self.settings.max_batch

    def check(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """``inputs`` checked against the model: names, datatypes, shapes, one row count."""
        names = [i.name for i in self.inputs]
        if set(inputs) != set(names):
            msg = f"inputs {sorted(inputs)} do not match the model's inputs {names}"
            raise BadRequest(msg)
        checked, rows = {}, set()
        for info in self.inputs:
            array = np.asarray(inputs[info.name])
            want = NUMPY_DTYPES[info.datatype]
            if array.dtype != want:
                msg = (
                    f"input {info.name!r} has datatype {array.dtype}, the model takes "
                    f"{info.datatype} ({np.dtype(want).name})"
                )
                raise BadRequest(msg)
            if array.ndim != len(info.shape) or any(
                d != -1 and d != n for d, n in zip(info.shape[1:], array.shape[1:], strict=False)
            ):
                msg = (
                    f"input {info.name!r} has shape {list(array.shape)}, the model takes "
                    f"{list(info.shape)} (-1: any size)"
                )
                raise BadRequest(msg)
            checked[info.name] = np.ascontiguousarray(array)
            rows.add(array.shape[0])
        if len(rows) != 1:
            msg = f"the inputs disagree on the batch size: {sorted(rows)}"
            raise BadRequest(msg)
        (n,) = rows
        limit = self.fixed_batch or self.settings.max_rows
        if n < 1 or n > limit or (self.fixed_batch and n != self.fixed_batch):
            allowed = f"exactly {self.fixed_batch}" if self.fixed_batch else f"1 to {limit}"
            msg = f"a request holds {n} rows; allowed: {allowed}"
            raise BadRequest(msg)
        return checked, n

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Future:
        """Queue one request (checked first); its future gives an `Answer`.

        Raises `BadRequest` for tensors that do not fit and `Busy` when the queue is full.
        """
        checked, rows = self.check(inputs)
        request = _Request(checked, rows, Future())
        with self._lock:
            if self._closed:
                msg = "the batcher is shutting down"
                raise Busy(msg)
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                msg = f"{self.settings.max_queue} requests are already waiting; retry later"
                raise Busy(msg) from None
        return request.future

    def run(self, inputs: Mapping[str, np.ndarray]) -> Answer:
        """`submit` and wait for the answer."""
        return self.submit(inputs).result()

    def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self, session: Any) -> None:
        carry, stopping = None, False
        while True:
            first = carry if carry is not None else (None if stopping else self._queue.get())
            carry = None
            if first is None or first is _STOP:
                return
            batch, rows = [first], first.rows
            limit = 1 if self.fixed_batch else self.settings.max_batch
            deadline = first.arrived + self.settings.max_wait_ms / 1000
            while rows < limit and not stopping:
                left = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                elif rows + item.rows <= limit and first.fits(item):
                    batch.append(item)
                    rows += item.rows
                else:
                    carry = item
                    break
            self._run(session, batch, rows)

    def _run(self, session: Any, batch: list[_Request], rows: int) -> None:
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs}
            results = session.run(feeds)
            if len(batch) > 1 and any(r.ndim == 0 or r.shape[0] != rows for r in results):
                msg = "an output has no batch axis to split"  # run each request alone
                raise ValueError(msg)
        except Exception as exc:  # every caller must hear of it
            if len(batch) > 1:  # one bad request must not fail the others
                for request in batch:
                    self._run(session, [request], request.rows)
                return
            batch[0].future.set_exception(exc)
            return
        run_ms = (time.perf_counter() - start) * 1000
        offset = 0
        for request in batch:
            part = slice(offset, offset + request.rows)
            offset += request.rows
            outputs = {
                o.name: (r[part] if len(batch) > 1 else r)
                for o, r in zip(self.outputs, results, strict=True)
            }
            queue_ms = (start - request.arrived) * 1000
            request.future.set_result(Answer(outputs, queue_ms, run_ms, rows))
