"""The CPU runtimes that run an ONNX file: which are installed, their settings, and the
lines that deploy an artifact with the settings the report measured.

Measuring (`compressor.runtime.measure`) and the report's deployment snippet read the settings
from here, so what the report shows is what was timed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from ..errors import UserError

ONNX_RUNTIMES = ("onnxruntime", "openvino")
"""The CPU runtimes an ONNX file can be measured in; ONNX Runtime is always installed."""

_EXTRAS = {"openvino": "compressor[openvino]"}


def installed_runtimes() -> list[str]:
    """The `ONNX_RUNTIMES` whose Python package is installed here."""
    return [r for r in ONNX_RUNTIMES if importlib.util.find_spec(r) is not None]


def check_runtimes(runtimes: Sequence[str] | str | None) -> tuple[str, ...]:
    """``runtimes`` validated (None: every installed one), ONNX Runtime first and always."""
    if runtimes is None:
        return tuple(installed_runtimes())
    if isinstance(runtimes, str):
        runtimes = [runtimes]
    chosen = ["onnxruntime"]
    for runtime in runtimes:
        if runtime not in ONNX_RUNTIMES:
            msg = f"unknown runtime {runtime!r}; allowed: {', '.join(ONNX_RUNTIMES)}"
            raise UserError(msg)
        if importlib.util.find_spec(runtime) is None:
            msg = (
                f"runtime {runtime!r} is not installed here "
                f"(pip install '{_EXTRAS.get(runtime, runtime)}')"
            )
            raise UserError(msg)
        if runtime not in chosen:
            chosen.append(runtime)
    return tuple(chosen)


def ort_options(threads: int) -> Any:
    """ONNX Runtime session options: all graph optimisations, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def openvino_settings(threads: int) -> dict[str, Any]:
    """OpenVINO's CPU settings: ``threads`` threads, latency hint, FP32 for float layers.

    ``INFERENCE_PRECISION_HINT: f32`` keeps the layers left in float at FP32 on CPUs with
    bf16 or fp16 units, so the numbers match the ONNX file's float semantics.
    """
    return {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }


def runtime_versions() -> dict[str, str]:
    """Versions of the installed runtimes besides ONNX Runtime (``{"openvino": "..."}``)."""
    versions = {}
    if "openvino" in installed_runtimes():
        import openvino

        versions["openvino"] = openvino.__version__
    return versions


def deployment_snippet(
    runtime: str, file: str, threads: int, inputs: list[dict[str, Any]] | None = None
) -> str:
    """Python lines that load ``file`` in ``runtime`` with the measured settings and run it.

    ``inputs`` (report.json's ``model_io.inputs``) names the file's inputs; without it, or
    with one float input, the snippet feeds one float32 ``batch``.
    """
    named = bool(inputs) and (
        len(inputs) > 1 or not str(inputs[0].get("dtype", "float")).startswith("float")
    )
    comment = feed = ""
    if named:
        described = ", ".join(
            f"{i['name']} {_numpy_dtype(i)} (batch, {', '.join(map(str, i['shape']))})"
            for i in inputs
        )
        feed = ", ".join(f"{i['name']!r}: {i['name']}.astype(np.{_numpy_dtype(i)})" for i in inputs)
        comment = f"# inputs: {described}\n"
    if runtime == "openvino":
        settings = openvino_settings(threads)
        run = (
            f"{comment}outputs = request.infer({{{feed}}})[compiled.output(0)]\n"
            if named
            else "# batch: a float32 array shaped like the model's input\n"
            "outputs = request.infer({0: batch.astype(np.float32)})[compiled.output(0)]\n"
        )
        return (
            "import numpy as np\n"
            "import openvino as ov\n\n"
            f"compiled = ov.Core().compile_model({file!r}, 'CPU', {settings!r})\n"
            "request = compiled.create_infer_request()\n" + run
        )
    if runtime == "onnxruntime":
        run = (
            f"{comment}outputs = session.run(None, {{{feed}}})[0]\n"
            if named
            else "name = session.get_inputs()[0].name\n"
            "# batch: a float32 array shaped like the model's input\n"
            "outputs = session.run(None, {name: batch.astype(np.float32)})[0]\n"
        )
        return (
            "import numpy as np\n"
            "import onnxruntime as ort\n\n"
            "options = ort.SessionOptions()\n"
            f"options.intra_op_num_threads = {threads}\n"
            "options.inter_op_num_threads = 1\n"
            "options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL\n"
            "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
            f"session = ort.InferenceSession({file!r}, options, "
            "providers=['CPUExecutionProvider'])\n" + run
        )
    msg = f"unknown runtime {runtime!r}; allowed: {', '.join(ONNX_RUNTIMES)}"
    raise UserError(msg)


def _numpy_dtype(info: dict[str, Any]) -> str:
    dtype = str(info.get("dtype", "float32"))
    return "float32" if dtype.startswith(("float", "bfloat")) else dtype
