"""`quantize`: the INT8 stage as one call, for a model the user trained and pruned in their
own loop."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_path
from ..errors import DataError, ModelError, UserError
from ..models.layers import unwrap_parallel
from ..stage import State, standalone_context
from .int8 import Int8Quantization


def quantize(
    model: nn.Module,
    calibration_data: Any,
    output: str | Path,
    *,
    eval_data: Any = None,
    io: Any = None,
    threads: int | None = None,
    progress: bool = False,
    **options: Any,
) -> Path:
    """Export ``model`` to ONNX and write its INT8 file to ``output``, as the INT8 stage does.

    The same choices as `Int8Quantization` (static QDQ or dynamic by model, activation and
    weight types for this CPU, per-channel weights, FP32 placement of the nodes INT8 makes
    slower) and the same checks (the export's parity with ``model``, the INT8 graph ONNX
    Runtime runs); ``options`` are that stage's options (``calibration_samples``,
    ``method``, ``max_accuracy_drop``, ...). ``model`` is not changed; the file is written
    atomically.

    Args:
        model: the float model (a module; under DDP, the wrapper or its module).
        calibration_data: batches of ``(inputs, targets)`` (a DataLoader) or a `DataSpec`:
            the activation ranges are calibrated on ``calibration_samples`` of them.
        output: the INT8 ONNX file to write (``.onnx``).
        eval_data: batches the parity checks (and a ``max_accuracy_drop``) run on; the
            calibration data when None.
        io: which output to export (`ModelIO`) for a model whose output is not a tensor.
        threads: CPU threads for the checks and timings (default: every core).
        progress: print what it does on stderr.

    Returns:
        ``output`` as a `Path`.

    Raises:
        RecipeError: an unknown or bad option (named, with what is allowed).
        DataError: calibration data the model cannot run on (its shape is named).
    """
    stage = Int8Quantization.from_dict(options)
    output = Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"quantize: output must be an .onnx file path (got: {str(output)!r})")
    if output.is_dir():
        raise UserError(f"quantize: output {str(output)!r} is a folder; give a file path")
    base = unwrap_parallel(model)
    if not isinstance(base, nn.Module):
        raise UserError(f"model must be a torch.nn.Module (got: {type(model).__name__})")
    work = copy.deepcopy(base).cpu().eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compressor-quantize-") as tmp:
        try:
            work, ctx = standalone_context(
                work,
                calibration_data,
                calibration_data if eval_data is None else eval_data,
                Path(tmp),
                io=io,
                threads=threads,
                progress=progress,
                step=stage.name,
                names=("calibration_data", "eval_data"),
            )
        except ModelError as exc:
            raise DataError(f"quantize: {exc}") from exc
        example = ctx.train_data.example_input()
        state = State(model=work, teacher=work, example_input=example)
        state = stage.apply(state, dataclasses.replace(ctx, upcoming=()))
        assert state.onnx_path is not None
        with atomic_path(output) as out:
            shutil.copyfile(state.onnx_path, out)
    return output
