"""Int8Quantization: static post-training INT8 quantization in ONNX Runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from .._io import atomic_path
from ..data import DataSpec, data_subset
from ..errors import ModelError, RecipeError
from ..runtime.export import DEFAULT_OPSET, export_onnx, tail_nodes
from ..runtime.measure import (
    onnx_predictor,
    ort_predictor,
    ort_session,
    sample_batch,
    timed_runs,
)
from ..stage import Stage, check_bool, check_choice, check_float, check_int, register_stage
from ..training.loop import OPTIMIZERS
from .budget import revert_to_budget
from .calibration import CALIBRATION_MEMORY, _CalibrationReader, activation_bytes, graph_inputs
from .mode import (
    MODES,
    activation_matmuls,
    choose_mode,
    has_convolutions,
    quantize_dynamic_file,
)
from .onnx_edits import (
    _pre_process,
    inspect_int8_graph,
    needs_external_data,
    save_single_file,
)
from .placement import place_fp32
from .qat import quantization_aware_training
from .types import TYPES, choose_types

if TYPE_CHECKING:
    from ..stage import RunContext, State

METHODS = ("minmax", "entropy", "percentile")
QAT_CHOICES = ("auto", "always", "never")


@register_stage("int8_quantization")
@dataclass(frozen=True)
class Int8Quantization(Stage):
    """Export to ONNX and quantize to INT8 with ONNX Runtime: static (QDQ, calibrated) or
    dynamic (MatMul/Gemm inputs quantized at run time), per model.

    Writes ``OUTPUT/model.int8.onnx``. Calibration inputs are drawn from the training data.

    Args:
        mode: ``auto`` (static for a model with convolutions; otherwise both are made and
            timed; the one clearly closer to FP32 is kept, else the faster, see
            `compressor.quantization.mode`), ``static`` or ``dynamic``. The choice and both timings
            are in the row's ``details.quantization.mode_choice``.
        calibration_samples: how many training samples calibrate the activation ranges.
        method: calibration method: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: one scale per output channel of each weight (recommended for convs).
        activation_type: ``auto`` (fastest for this CPU; see `choose_types`), ``uint8``, ``int8``.
        weight_type: ``int8`` or ``uint8``.
        reduce_range: 7-bit weights; ``null`` chooses by CPU (on for x86 without VNNI).
        opset: ONNX opset of the export (>= 17).
        fp32_placement: keep in FP32 the compute nodes INT8 makes slower: each suspect
            (a conv with few input channels per group, such as an image stem) is reverted
            to FP32 on trial and kept so when the whole file measures faster in the fastest
            of the run's runtimes and accuracy on the eval data does not fall.
        placement_candidates: how many suspect nodes to try at most (each costs a few
            seconds of timing).
        max_accuracy_drop: the most accuracy (a fraction, on the eval data in ONNX Runtime)
            INT8 may lose against the FP32 model it quantizes; when it loses more, the nodes
            INT8 hurts most are reverted to FP32, fewest first, until it does not (see
            `compressor.quantization.budget`). ``null``: no budget of its own (a pipeline's
            ``max_accuracy_drop`` still applies).
        sensitivity_samples: eval inputs on which each node's INT8 error is measured when
            nodes must be reverted.
        head_fp32: for a detector, the heads' last layers (per-anchor class scores and box
            offsets, `compressor.models.detection.DetectionHead.keep_fp32`) stay in FP32; box
            decoding and NMS are never in the file.
        detector_max_accuracy_drop: for a detector, the budget (mAP, a fraction) applied
            when ``max_accuracy_drop`` is null: INT8 detectors often lose most of their mAP
            in their first layers (a flat background's rounding error, amplified layer by
            layer), and the budget reverts those layers to FP32. ``null``: none.
        qat: quantization-aware training of the static INT8 file (`compressor.quantization.qat`:
            the file's own graph fine-tuned with fake quantization against the original
            model, its weights and scales written back): ``auto`` when the file misses an
            accuracy budget, before any node is reverted to FP32 for it; ``always``;
            ``never``.
        qat_epochs: QAT's passes over the training data.
        qat_lr: QAT's learning rate (cosine decay to zero, as the other training stages;
            AdamW runs at ``lr`` x 0.02, so the default 0.02 is AdamW at 4e-4).
        qat_optimizer: ``adamw`` (default: measured to win back what an outlier activation
            cost where SGD made it worse, benchmarks/README.md), ``sgd``, ``auto`` or
            ``probe`` (`compressor.training.loop.train`).
    """

    mode: str = "auto"
    calibration_samples: int = 512
    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "auto"
    weight_type: str = "int8"
    reduce_range: bool | None = None
    opset: int = DEFAULT_OPSET
    fp32_placement: bool = True
    placement_candidates: int = 3
    max_accuracy_drop: float | None = None
    sensitivity_samples: int = 256
    head_fp32: bool = True
    detector_max_accuracy_drop: float | None = 0.015
    qat: str = "auto"
    qat_epochs: int = 1
    qat_lr: float = 0.02
    qat_optimizer: str = "adamw"

    name = "int8_quantization"
    phase = "quantization"
    runtime = "onnxruntime"
    precision = "int8"

    def __post_init__(self) -> None:
        check_choice(self.name, "mode", self.mode, MODES)
        check_int(self.name, "calibration_samples", self.calibration_samples, minimum=1)
        check_choice(self.name, "method", self.method, METHODS)
        check_bool(self.name, "per_channel", self.per_channel)
        check_choice(self.name, "activation_type", self.activation_type, TYPES)
        check_choice(self.name, "weight_type", self.weight_type, ("int8", "uint8"))
        if self.reduce_range is not None:
            check_bool(self.name, "reduce_range", self.reduce_range)
        check_int(self.name, "opset", self.opset, minimum=17)
        check_bool(self.name, "fp32_placement", self.fp32_placement)
        check_int(self.name, "placement_candidates", self.placement_candidates, minimum=0)
        if self.max_accuracy_drop is not None:
            check_float(self.name, "max_accuracy_drop", self.max_accuracy_drop, low=0, high=1)
        check_int(self.name, "sensitivity_samples", self.sensitivity_samples, minimum=1)
        check_bool(self.name, "head_fp32", self.head_fp32)
        if self.detector_max_accuracy_drop is not None:
            drop = self.detector_max_accuracy_drop
            check_float(self.name, "detector_max_accuracy_drop", drop, low=0, high=1)
        check_choice(self.name, "qat", self.qat, QAT_CHOICES)
        check_int(self.name, "qat_epochs", self.qat_epochs, minimum=1)
        check_float(self.name, "qat_lr", self.qat_lr, low=0.0, low_open=True)
        check_choice(self.name, "qat_optimizer", self.qat_optimizer, OPTIMIZERS)
        if self.qat == "always" and self.mode == "dynamic":
            msg = f"{self.name}: qat 'always' trains a static INT8 file; mode 'dynamic' makes none"
            raise RecipeError(msg)

    def apply(self, state: State, ctx: RunContext) -> State:
        """Export ``state.model``, quantize it and write ``model.int8.onnx``."""
        types = choose_types(self.activation_type, self.weight_type, self.reduce_range)
        final = ctx.output_dir / "model.int8.onnx"
        notes: list[str] = []
        clock = _Clock()
        with tempfile.TemporaryDirectory(prefix="compressor-") as tmp:
            fp32 = Path(tmp) / "model.fp32.onnx"
            ctx.log(f"{ctx.step}: exporting the current model to ONNX")
            parity = export_onnx(
                state.model,
                state.example_input,
                fp32,
                check_inputs=sample_batch(ctx.eval_data, 64),
                opset=self.opset,
                threads=ctx.threads,
                labels=ctx.io.labels,
            )
            clock.lap("export")
            external = needs_external_data(fp32)  # over 2 GB: weights beside every file
            source, pre_process, error = _pre_process(fp32, Path(tmp) / "model.pre.onnx", external)
            if error:  # pre-processing is an optimisation, not a requirement
                notes.append(
                    f"ONNX Runtime's quant_pre_process failed ({error}); quantized without it"
                )
            clock.lap("pre_process")
            per_sample = activation_bytes(source)
            max_batch = max(1, CALIBRATION_MEMORY // max(per_sample, 1))
            try_dynamic = self.mode == "dynamic" or (
                self.mode == "auto" and self.qat != "always" and not has_convolutions(source)
            )
            dynamic = Path(tmp) / "dynamic" / "model.int8.onnx"
            if try_dynamic:
                ctx.log(f"{ctx.step}: quantizing dynamically (MatMul, Gemm)")
                dynamic.parent.mkdir()
                quantize_dynamic_file(
                    source,
                    dynamic,
                    per_channel=self.per_channel,
                    reduce_range=types.reduce_range,
                    external=external,
                )
                clock.lap("dynamic")
            seen, placement, mode_choice = 0, None, None
            quantized = dynamic
            head = self._head(source, ctx)
            if self.mode != "dynamic":
                ctx.log(f"{ctx.step}: calibrating ({self.method}) and quantizing")
                quantized = Path(tmp) / "int8" / "model.int8.onnx"
                quantized.parent.mkdir()
                seen = self.quantize_file(
                    source,
                    quantized,
                    ctx.train_data,
                    samples=self.calibration_samples,
                    max_batch=max_batch,
                    external=external,
                    progress=ctx.progress,
                    exclude=head,
                )
                clock.lap("calibrate_quantize")
                if self.fp32_placement and self.placement_candidates and not external:
                    ctx.log(f"{ctx.step}: timing INT8 against FP32 for the suspect nodes")
                    quantized, placement = place_fp32(
                        quantized, source, ctx, self.placement_candidates
                    )
                    notes += placement.pop("notes")
                    clock.lap("placement")
            floor, fp32_accuracy = self._min_accuracy(ctx, source)
            dynamic_accuracy = None  # measured once, when a budget needs it
            if try_dynamic and self.mode == "auto":
                ctx.log(f"{ctx.step}: timing static against dynamic INT8")
                mode_choice = choose_mode(fp32, quantized, dynamic, ctx)
                if mode_choice["chosen"] == "dynamic" and floor is not None:
                    dynamic_accuracy = self._accuracy(dynamic, ctx)
                    if dynamic_accuracy < floor:
                        mode_choice.update(chosen="static", reason="dynamic misses the budget")
                if mode_choice["chosen"] == "dynamic":
                    quantized, placement = dynamic, None
                clock.lap("mode_choice")
            chosen = "dynamic" if quantized == dynamic else "static"
            kept = [*head, *(placement["fp32_nodes"] if placement else [])]
            if chosen == "dynamic":
                kept = activation_matmuls(source)
            budget, qat, int8_accuracy = None, None, None
            if chosen == "static" and (self.qat == "always" or floor is not None):
                if floor is not None and fp32_accuracy is None:
                    fp32_accuracy = self._accuracy(source, ctx)
                quantized, source, qat, int8_accuracy = self._qat(
                    quantized, source, state, ctx, floor, fp32_accuracy, tmp
                )
                if qat is not None:
                    notes += _qat_notes(qat)
                    clock.lap("qat")
            if floor is not None and chosen == "dynamic":
                accuracy = dynamic_accuracy
                if accuracy is None:
                    accuracy = self._accuracy(dynamic, ctx)
                budget = {"min_accuracy": round(floor, 6), "int8_accuracy": round(accuracy, 6)}
                budget.update(met=accuracy >= floor, fp32_nodes=[], trials=[])
                if not budget["met"]:
                    notes.append(
                        f"dynamic INT8 reaches {accuracy:.4f}, under the budget's {floor:.4f}; "
                        "mode: auto or static can revert nodes to FP32"
                    )
            elif floor is not None:
                quantized, budget = revert_to_budget(
                    quantized,
                    source,
                    ctx,
                    floor,
                    samples=self.sensitivity_samples,
                    exclude=kept,
                    fp32_accuracy=fp32_accuracy,
                    int8_accuracy=int8_accuracy,
                    in_prefix=placement["fp32_nodes"] if placement else (),
                )
                kept = list(  # a placed node a prefix reverted again is named once
                    dict.fromkeys(
                        [
                            *kept,
                            *budget["fp32_nodes"],
                            *budget.get("fp32_producers", []),
                            *budget.get("fp32_other_nodes", []),
                        ]
                    )
                )
                notes += _budget_notes(budget)
                clock.lap("accuracy_budget")
            with atomic_path(final) as out:
                save_single_file(quantized, out, external)
                graph = inspect_int8_graph(
                    out, ctx.threads, Path(tmp) / "optimized.onnx", kept_fp32=kept
                )
            speedup = _int8_speedup(fp32, final, ctx)
            clock.lap("check")
        if graph["float_compute_ops"]:
            names = ", ".join(graph["float_compute_ops"][:5])
            notes.append(
                f"{len(graph['float_compute_ops'])} compute op(s) still run in FP32 in the graph "
                f"ONNX Runtime executes: {names}"
            )
        if speedup < 1.0:
            notes.append(
                f"the INT8 model is not faster than its FP32 export at batch 1 on this CPU "
                f"({speedup:.2f}x)"
            )
        details = {
            "quantization": {
                "format": "QDQ" if chosen == "static" else "dynamic",
                "mode": self.mode,
                "mode_choice": mode_choice,
                "activation_type": types.activation_type if chosen == "static" else "uint8",
                "weight_type": types.weight_type,
                "reduce_range": types.reduce_range,
                "per_channel": self.per_channel,
                "method": self.method if chosen == "static" else None,
                "calibration_samples": seen,
                "calibration_batch_limit": max_batch,
                "pre_process": pre_process,
                "types_reason": types.reason,
                "speedup_vs_fp32_onnx": round(speedup, 3),
                "placement": placement,
                **({"qat": qat} if qat else {}),
                **({"accuracy_budget": budget} if budget else {}),
                **graph,
                "seconds": clock.laps,
            },
            "parity_fp32": parity.to_dict(),
            "notes": notes,
        }
        for note in notes:
            warnings.warn(f"int8_quantization: {note}", stacklevel=2)
        return state.replace(onnx_path=final, details=details)

    def quantize_file(
        self,
        source: Path,
        out: Path,
        data: DataSpec,
        *,
        samples: int,
        max_batch: int | None = None,
        external: bool = False,
        progress: bool = False,
        exclude: Sequence[str] = (),
    ) -> int:
        """Quantize the FP32 ONNX file ``source`` into ``out`` with this stage's settings
        (static QDQ), calibrated on ``samples`` inputs of ``data``, the nodes ``exclude``
        names left in FP32; returns how many inputs it read."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        types = choose_types(self.activation_type, self.weight_type, self.reduce_range)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.method]
        if max_batch is None:
            max_batch = max(1, CALIBRATION_MEMORY // max(activation_bytes(source), 1))
        reader = _CalibrationReader(data, graph_inputs(source), samples, progress, max_batch)
        # ONNX Runtime's histogram calibrators print progress on stdout, which belongs
        # to the caller (compressor compress --json writes its JSON there).
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            quantize_static(
                str(source),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=self.per_channel,
                reduce_range=types.reduce_range,
                activation_type=qtype[types.activation_type],
                weight_type=qtype[types.weight_type],
                calibrate_method=method,
                use_external_data_format=external,
                nodes_to_exclude=list(exclude),
            )
        return reader.seen

    def quantize_layer(self, fp32: Path, out: Path, data: DataSpec, *, samples: int) -> Path:
        """A small FP32 ONNX file (a layer, for timing) pre-processed and quantized with this
        stage's settings into ``out``, calibrated on ``samples`` inputs of ``data``."""
        source, _, _ = _pre_process(fp32, out.with_name(out.stem + ".pre.onnx"), False)
        self.quantize_file(source, out, data, samples=samples)
        return out

    def quantize_sample(
        self,
        fp32: Path,
        out: Path,
        ctx: RunContext,
        *,
        samples: int = 8,
        placement: bool = True,
        budget: bool = False,
    ) -> tuple[Path, dict[str, Any] | None]:
        """Quantize ``fp32`` as `apply` would, calibrated on ``samples`` training inputs only,
        for a candidate's size, speed and accuracy: a detector's head in FP32, with the
        stage's FP32 placement (decided on at most 256 eval inputs) when ``placement``, and
        when ``budget`` the accuracy budget's reverted nodes (`revert_to_budget`, against
        ``ctx.min_accuracy`` and the stage's own budget). Returns the file (``out``, or the
        choice beside it) and the budget's record (None when no budget applied)."""
        source, _, _ = _pre_process(fp32, out.with_name(out.stem + ".pre.onnx"), False)
        if self.mode == "dynamic" or (self.mode == "auto" and not has_convolutions(source)):
            types = choose_types(self.activation_type, self.weight_type, self.reduce_range)
            quantize_dynamic_file(
                source,
                out,
                per_channel=self.per_channel,
                reduce_range=types.reduce_range,
                external=False,
            )
            return out, None  # a model without convolutions: dynamic, as `apply` most often keeps
        head = self._head(source, ctx)
        self.quantize_file(source, out, ctx.train_data, samples=samples, exclude=head)
        chosen = out
        if placement and self.fp32_placement and self.placement_candidates:
            small = dataclasses.replace(ctx, eval_data=data_subset(ctx.eval_data, 256))
            chosen, _ = place_fp32(out, source, small, self.placement_candidates)
        floor, fp32_accuracy = self._min_accuracy(ctx, source) if budget else (None, None)
        if floor is None:
            return chosen, None
        return revert_to_budget(
            chosen,
            source,
            ctx,
            floor,
            samples=self.sensitivity_samples,
            exclude=head,
            fp32_accuracy=fp32_accuracy,
        )

    def _qat(
        self,
        quantized: Path,
        source: Path,
        state: State,
        ctx: RunContext,
        floor: float | None,
        fp32_accuracy: float | None,
        tmp: str,
    ) -> tuple[Path, Path, dict[str, Any] | None, float | None]:
        """Quantization-aware training of ``quantized`` when ``qat`` asks for it (``auto``:
        when its accuracy is under ``floor`` and the FP32 model's, ``fp32_accuracy``, is
        not): the file to go on with, the FP32 file its nodes revert from, QAT's record
        (None when it did not run) and the accuracy of the file it returns when it was
        measured (None otherwise), so that nothing measures it twice."""
        ptq = None
        if self.qat == "never" or (self.qat == "auto" and floor is None):
            return quantized, source, None, None
        if self.qat == "auto" and fp32_accuracy is not None and fp32_accuracy < floor:
            return quantized, source, None, None  # lost before INT8: QAT is not the cure
        if self.qat == "auto":
            ptq = self._accuracy(quantized, ctx)
            if ptq >= floor:  # type: ignore[operator]
                return quantized, source, None, ptq
        if needs_external_data(source):
            skipped = {"skipped": "over 2 GB: the file is not trained"}
            return quantized, source, skipped, ptq
        ctx.log(f"{ctx.step}: quantization-aware training ({self.qat_epochs} epoch(s))")
        types = choose_types(self.activation_type, self.weight_type, self.reduce_range)
        try:
            int8, fp32, info = quantization_aware_training(
                quantized,
                source,
                state.teacher,
                ctx,
                Path(tmp) / "qat",
                epochs=self.qat_epochs,
                lr=self.qat_lr,
                optimizer=self.qat_optimizer,
                weight_qmax=64 if types.reduce_range else 127,
            )
        except ModelError as exc:  # a graph QDQModule cannot compute
            if self.qat == "always":
                raise ModelError(f"{self.name}: {exc} (qat: never skips it)") from exc
            return quantized, source, {"skipped": str(exc)}, ptq
        ptq = self._accuracy(quantized, ctx) if ptq is None else ptq
        accuracy = self._accuracy(int8, ctx)
        info = {"ptq_accuracy": round(ptq, 6), "accuracy": round(accuracy, 6), **info}
        if floor is not None:
            info.update(min_accuracy=round(floor, 6), met=accuracy >= floor)
        # the calibrated file goes on when training made it worse, or when the budget's
        # FP32 fallback must run anyway: reverting nodes of the trained file to its trained
        # float weights mixes weights tuned for rounding with unrounded ones
        if accuracy < ptq or not info.get("met", True):
            info["kept"] = "ptq"
            return quantized, source, info, ptq
        info["kept"] = "qat"
        return int8, fp32, info, accuracy

    def _head(self, source: Path, ctx: RunContext) -> list[str]:
        """The detector head's nodes in ``source`` that stay FP32 (``head_fp32``), or none."""
        detector = ctx.io.detection
        if not (self.head_fp32 and detector is not None and detector.keep_fp32):
            return []
        return tail_nodes(onnx.load(str(source)), detector.keep_fp32)

    @staticmethod
    def _accuracy(path: Path, ctx: RunContext) -> float:
        """``ctx.eval_fn`` of the ONNX file ``path`` over the eval data, in ONNX Runtime."""
        return float(ctx.eval_fn(onnx_predictor(path, ctx.threads), ctx.eval_data))

    def _min_accuracy(self, ctx: RunContext, fp32: Path) -> tuple[float | None, float | None]:
        """The lowest accuracy the INT8 file may have: this stage's budget (a detector's
        when it has none) against the model it quantizes and the pipeline's against the
        baseline, the stricter one; and ``fp32``'s accuracy when it was measured for it
        (None otherwise), so that nothing measures it twice."""
        floors = [] if ctx.min_accuracy is None else [ctx.min_accuracy]
        drop = self.max_accuracy_drop
        if drop is None and ctx.io.detection is not None:
            drop = self.detector_max_accuracy_drop
        measured = None
        if drop is not None:
            measured = self._accuracy(fp32, ctx)
            floors.append(measured - drop)
        return (max(floors) if floors else None), measured


def _qat_notes(qat: dict[str, Any]) -> list[str]:
    """The report notes of quantization-aware training."""
    if "skipped" in qat:
        return [f"quantization-aware training skipped: {qat['skipped']}"]
    text = (
        f"quantization-aware training ({qat['epochs']} epoch(s)): INT8 accuracy "
        f"{qat['ptq_accuracy']:.4f} after calibration, {qat['accuracy']:.4f} after QAT"
    )
    if "min_accuracy" in qat:
        text += f" (at least {qat['min_accuracy']:.4f} needed)"
    if qat["kept"] == "ptq" and not qat.get("met", True):
        text += "; under the budget, so the calibrated file goes on to the FP32 fallback"
    elif qat["kept"] == "ptq":
        text += "; QAT did not help, the calibrated file is kept"
    return [text]


def _budget_notes(budget: dict[str, Any]) -> list[str]:
    """The report notes of an accuracy budget's outcome."""
    count = len(budget["fp32_nodes"])
    if budget["met"] and not budget["trials"]:
        return []
    if not budget["trials"]:
        return [
            f"the model before INT8 is already under the accuracy budget (FP32 "
            f"{budget['fp32_accuracy']:.4f}, at least {budget['min_accuracy']:.4f} needed): "
            "the stages before INT8 lost it, so no node was kept in FP32 for it"
        ]
    reached = budget["accuracy"]
    if budget["met"]:
        what = f"{count} node(s)"
        if budget.get("order") == "prefix":
            other = len(budget.get("fp32_other_nodes", []))
            what = (
                f"the first {count} compute node(s) and the {other} op(s) before and between them"
            )
        return [
            f"{what} kept in FP32 to stay within the accuracy budget "
            f"(INT8 {budget['int8_accuracy']:.4f} -> {reached:.4f}, at least "
            f"{budget['min_accuracy']:.4f} needed): {', '.join(budget['fp32_nodes'][:5])}"
        ]
    return [
        f"the accuracy budget is not met even with {count} node(s) in FP32: accuracy "
        f"{reached:.4f}, at least {budget['min_accuracy']:.4f} needed (the FP32 model "
        f"before INT8 has {budget['fp32_accuracy']:.4f})"
    ]


class _Clock:
    """Wall time of each step of a stage, in seconds."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = round(now - self._last, 2)
        self._last = now


def _int8_speedup(fp32: Path, int8: Path, ctx: RunContext) -> float:
    """Batch-1 p50 latency of the FP32 export over the INT8 file, measured side by side."""
    x = sample_batch(ctx.eval_data, 1)
    medians = []
    for path in (fp32, int8):
        predict = ort_predictor(ort_session(path, ctx.threads))
        medians.append(timed_runs(lambda p=predict: p(x)).median)
    return medians[0] / medians[1]
