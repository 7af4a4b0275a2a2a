"""The artifact on a serving engine past one machine: a Triton model repository and a KServe
InferenceService manifest, carrying the batching settings the load test measured.

`triton_config` writes Triton's ``config.pbtxt`` for its ONNX Runtime backend: every input
and output of the file with its datatype and dims, the batch axis, ``dynamic_batching``
with the measured largest batch (its preferred size), longest wait and queue bound, and an
``instance_group`` of ``sessions`` CPU instances of ``threads`` intra-op threads each.
`write_triton_repository` lays out ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx``
(with the tensor files of a model over 2 GB) and checks the config against Triton's own
schema (the ``ModelConfig`` protobuf that ``tritonclient[grpc]`` ships) when it is installed.
`inference_service` is the KServe ``v1beta1`` manifest that serves such a repository with
Triton over the same Open Inference Protocol as `compressor serve`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .batching import BatchSettings, TensorInfo, file_io
from .onnx_files import onnx_files

TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
}
"""Open Inference Protocol datatypes and Triton's ``DataType`` names for them."""

_TRITON_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_KUBERNETES_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def measured_settings(results: Any, file_name: str) -> tuple[BatchSettings, dict[str, Any]] | None:
    """The best setting the load test measured for the file named ``file_name``, and its
    ``best`` entry (``label``, ``concurrency``, ``throughput``, ``p99_ms``).

    ``results``: a run's report.json (its ``load`` section) or what ``compressor load
    --json`` prints (a list of results). None when nothing there measured that file; a
    `UserError` when it was measured but no setting met the p99 bound.
    """
    if isinstance(results, Mapping):
        results = list(((results.get("load") or {}).get("files") or {}).values())
    if not isinstance(results, list):
        return None
    for result in results:
        if not isinstance(result, Mapping) or Path(str(result.get("file"))).name != file_name:
            continue
        best = result.get("best")
        if not best:
            msg = (
                f"the load test measured {file_name} but no setting met its p99 bound of "
                f"{result.get('p99_ms')} ms; give --max-batch, --max-wait-ms, --sessions and "
                "--threads"
            )
            raise UserError(msg)
        entry = next(s for s in result["settings"] if s.get("label") == best["label"])
        fields = ("max_batch", "max_wait_ms", "sessions", "threads", "max_queue", "max_rows")
        return BatchSettings(**{k: entry[k] for k in fields if k in entry}), dict(best)
    return None


def settings_beside(path: Path) -> tuple[BatchSettings, dict[str, Any], Path] | None:
    """`measured_settings` for ``path`` from the report.json in its folder (a run's output
    folder), if that report load-tested it."""
    report = path.parent / "report.json"
    if not report.is_file():
        return None
    try:
        found = measured_settings(json.loads(report.read_text(encoding="utf-8")), path.name)
    except (ValueError, UserError):
        return None
    return (*found, report) if found else None


def triton_config(
    name: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], settings: BatchSettings
) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime backend (text protobuf).

    A file whose every input has a dynamic first axis is served batched: ``max_batch_size``
    is the setting's largest batch (one request holds at most that many rows), dims leave the
    batch axis out, and with ``max_batch > 1`` Triton's dynamic batcher waits up to
    ``max_wait_ms`` to fill it, with at most ``max_queue`` requests waiting. A file with a
    fixed batch axis gets ``max_batch_size: 0`` and its full shapes.
    """
    _check_triton_name(name)
    batched = all(t.shape and t.shape[0] == -1 for t in inputs)
    lines = [
        f"name: {json.dumps(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {settings.max_batch if batched else 0}",
    ]
    for key, tensors in (("input", inputs), ("output", outputs)):
        entries = []
        for tensor in tensors:
            dims = list(tensor.shape[1:] if batched else tensor.shape)
            if tensor.datatype not in TRITON_TYPES:
                msg = f"tensor {tensor.name!r} has datatype {tensor.datatype}, which Triton lacks"
                raise UserError(msg)
            # a tensor that is only the batch axis is [1] per row, reshaped to a scalar
            reshape = "" if dims else " reshape: { shape: [ ] }"
            entries.append(
                f"  {{ name: {json.dumps(tensor.name)} data_type: "
                f"{TRITON_TYPES[tensor.datatype]} dims: {dims or [1]}{reshape} }}"
            )
        lines.append(f"{key} [\n" + ",\n".join(entries) + "\n]")
    if batched and settings.max_batch > 1:
        lines.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {settings.max_batch} ]\n"
            f"  max_queue_delay_microseconds: {round(settings.max_wait_ms * 1000)}\n"
            f"  default_queue_policy {{ max_queue_size: {settings.max_queue} }}\n"
            "}"
        )
    lines.append(f"instance_group [ {{ count: {settings.sessions} kind: KIND_CPU }} ]")
    for key, value in (("intra_op_thread_count", settings.threads), ("execution_mode", 0)):
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def check_triton_config(text: str) -> dict[str, Any] | None:
    """``text`` parsed with Triton's own ``ModelConfig`` schema (a `UserError` if it does
    not parse), as a dict; None when ``tritonclient[grpc]`` is not installed."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except Exception:  # tritonclient without grpc raises a plain RuntimeError
        return None
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"config.pbtxt does not fit Triton's ModelConfig schema: {exc}") from exc
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def write_triton_repository(
    path: str | Path, repository: str | Path, settings: BatchSettings, name: str | None = None
) -> Path:
    """``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` for the ONNX file ``path``;
    returns the model's folder. An existing model folder of that name is never replaced;
    the folder appears whole or not at all."""
    path, repository = Path(path), Path(repository)
    if path.suffix != ".onnx" or not path.is_file():
        raise UserError(f"no ONNX file at {str(path)!r}")
    name = name or path.stem
    _check_triton_name(name)
    target = repository / name
    if target.exists():
        msg = f"{target} exists already; give another --name or --output (nothing was written)"
        raise UserError(msg)
    inputs, outputs = file_io(path)
    text = triton_config(name, inputs, outputs, settings)
    check_triton_config(text)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        (staging / "1").mkdir()
        for file in onnx_files(path):
            destination = "model.onnx" if file == path else file.name
            shutil.copy2(file, staging / "1" / destination)
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def inference_service(
    name: str,
    storage_uri: str,
    settings: BatchSettings,
    replicas: tuple[int, int] = (1, 1),
    scale_target: int | None = None,
) -> dict[str, Any]:
    """A KServe ``v1beta1`` InferenceService that serves the Triton repository at
    ``storage_uri`` with KServe's Triton runtime over the V2 protocol: ``replicas`` is
    (min, max); each replica requests ``sessions x threads`` CPUs, the cores the measured
    setting ran on; ``scale_target``: concurrent requests per replica before it scales out.
    """
    if not _KUBERNETES_NAME.match(name):
        msg = (
            f"KServe names must be lowercase letters, digits and '-', start with a letter, "
            f"at most 63 characters (got: {name!r}); give --name"
        )
        raise UserError(msg)
    low, high = replicas
    if not 0 <= low <= high or high < 1:
        raise UserError(f"replicas must be 0 <= MIN <= MAX, MAX >= 1 (got: {low}:{high})")
    if not re.match(r"^[a-z][a-z0-9+.-]*://", storage_uri):
        msg = (
            "the storage URI must be a URI such as s3://bucket/models or pvc://claim/path "
            f"(got: {storage_uri!r})"
        )
        raise UserError(msg)
    cpus = str(settings.sessions * settings.threads)
    predictor: dict[str, Any] = {"minReplicas": low, "maxReplicas": high}
    if scale_target:
        predictor |= {"scaleMetric": "concurrency", "scaleTarget": scale_target}
    predictor["model"] = {
        "modelFormat": {"name": "onnx"},
        "protocolVersion": "v2",
        "runtime": "kserve-tritonserver",
        "storageUri": storage_uri,
        "resources": {"requests": {"cpu": cpus}, "limits": {"cpu": cpus}},
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/created-by": "compressor"}},
        "spec": {"predictor": predictor},
    }


def _check_triton_name(name: str) -> None:
    if not _TRITON_NAME.match(name):
        msg = f"model names must be letters, digits, '_', '.' and '-' (got: {name!r})"
        raise UserError(msg)
