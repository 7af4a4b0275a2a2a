"""The pipeline: the state record stages share, the run context, and `Pipeline.run`."""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import as_data_spec
from ..errors import ModelError, RecipeError, UserError
from ..inputs import describe
from ..models.checkpoints import (
    model_fingerprint,
    save_checkpoint,
)
from ..models.model_io import ModelIO
from ..report.report import Report
from ..runtime.load import LoadTest
from ..runtime.measure import (
    EvalFn,
    default_threads,
    environment,
)
from ..runtime.runtimes import check_runtimes
from ..stage import LossFn, RunContext, Stage, State, resolve_data_io
from ..training import distributed
from ..training.loop import check_training_options, resolve_device
from .output_folder import HEAD_FILE, REPORT_FILES, run_folder
from .ranks import follow, in_sync, send_result, send_state
from .ratio_search import search_pruning_ratio, search_span
from .recipe import (
    check_budget,
    check_search_minutes,
    read_recipe,
    recipe_options,
    recipe_to_dict,
    stages_from_recipe,
)
from .resume import checkpoint_path, finished_stages, resume_settings
from .rows import final_parity, in_other_runtimes, measure_step, phase_seconds, start_state


@dataclass(frozen=True)
class PipelineResult:
    """What `Pipeline.run` returns."""

    model: nn.Module
    onnx_path: Path | None
    report: Report
    output_dir: Path
    budget_met: bool | None = None
    """With ``max_accuracy_drop``: whether the final artifact is within it (else None)."""


class Pipeline:
    """An ordered list of stages that takes a trained model to an INT8 ONNX artifact.

    ``max_accuracy_drop`` is an accuracy budget (a fraction): the final artifact may lose at
    most this much against the baseline. The INT8 stage keeps the nodes INT8 hurts most in
    FP32 to stay within it; when the run still misses it, the INT8 file is written as
    ``model.int8.over-budget.onnx`` and ``PipelineResult.budget_met`` is False.

    ``max_search_minutes`` (with a budget) searches the pruning ratio: the stages that
    depend on it (sparsity training, pruning, distillation) run once per candidate, from
    the pruning stage's ratio on, and the most pruned candidate within the budget is kept
    (`compressor.pruning.search`); every candidate is in ``details.pruning.search``.

    Example:
        >>> import compressor as cz
        >>> pipeline = cz.Pipeline([cz.StructuredPruning(ratio=0.5), cz.Int8Quantization()])
        >>> [s.name for s in pipeline.stages]
        ['structured_pruning', 'int8_quantization']
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        max_accuracy_drop: float | None = None,
        max_search_minutes: float | None = None,
    ) -> None:
        stages = list(stages)
        for stage in stages:
            if not isinstance(stage, Stage):
                msg = f"pipeline stages must be Stage instances (got: {stage!r})"
                raise RecipeError(msg)
        _check_order(stages)
        self.stages = stages
        self.max_accuracy_drop = check_budget(max_accuracy_drop)
        self.max_search_minutes = check_search_minutes(max_search_minutes)
        self._search_span = search_span(stages, self.options())
        self._training = False  # rank 0 is in a stage every rank trains

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any] | str | Path) -> Pipeline:
        """Build a pipeline from a recipe mapping, a YAML recipe file or a preset name."""
        if isinstance(recipe, Mapping):
            return cls(stages_from_recipe(recipe), **recipe_options(recipe))
        if not isinstance(recipe, (str, Path)):
            msg = (
                "a recipe is a mapping with a 'stages' list, a YAML file or a preset name "
                f"(got: {recipe!r})"
            )
            raise RecipeError(msg)
        mapping = read_recipe(recipe)
        return cls(stages_from_recipe(mapping), **recipe_options(mapping))

    def options(self) -> dict[str, Any]:
        """The pipeline options (the recipe's keys beside ``stages``) that are set."""
        options = {
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_search_minutes": self.max_search_minutes,
        }
        return {k: v for k, v in options.items() if v is not None}

    def to_recipe(self) -> dict[str, Any]:
        """The recipe mapping of this pipeline, every option filled in."""
        return recipe_to_dict(self.stages, **self.options())

    def step_names(self) -> list[str]:
        """Report row names: the stage names, numbered from the second repeat on."""
        seen: dict[str, int] = {}
        names = []
        for stage in self.stages:
            seen[stage.name] = seen.get(stage.name, 0) + 1
            count = seen[stage.name]
            names.append(stage.name if count == 1 else f"{stage.name}_{count}")
        return names

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options().items())
        return f"Pipeline({self.stages!r}{options})"

    def run(
        self,
        model: nn.Module,
        train_data: Any,
        eval_data: Any,
        *,
        output_dir: str | Path,
        loss_fn: LossFn | None = None,
        eval_fn: EvalFn | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        threads: int | None = None,
        progress: bool = True,
        limit_train_batches: int | None = None,
        mixed_precision: str | None = None,
        accumulate_grad_batches: int = 1,
        throughput_batch: int | Sequence[int] = 32,
        resume: bool = False,
        runtimes: Sequence[str] | None = None,
        load_test: bool | LoadTest = False,
        io: ModelIO | None = None,
        full_evaluation: bool = False,
    ) -> PipelineResult:
        """Compress ``model``; write the artifacts and report into ``output_dir``.

        Under ``torchrun`` every rank calls this with the same arguments: the training
        stages run data-parallel (DDP, each rank on its share of ``train_data``), rank 0
        alone prunes, exports, quantizes, measures and writes ``output_dir``, and every
        rank returns rank 0's result (docs/scale.md).

        Args:
            model: the trained float model. It is never modified; a frozen copy is the teacher.
            train_data: batches for training and calibration: a DataLoader of
                ``(inputs, targets)`` or a `DataSpec`.
            eval_data: batches for every accuracy in the report (same forms).
            output_dir: where model.onnx, model.int8.onnx, report.* and checkpoints/ go.
            loss_fn: ``loss_fn(outputs, targets) -> loss``; cross-entropy by default.
            eval_fn: ``eval_fn(predict, eval_data) -> float``, higher is better; ``predict``
                maps an input batch to outputs for torch and ONNX Runtime alike. Top-1 by default.
            device: where training runs; CUDA when available by default. Measuring is on the CPU.
            seed: seeds every training stage.
            threads: CPU threads for every measurement (torch and ONNX Runtime alike).
            progress: show progress bars and stage messages on stderr.
            limit_train_batches: stop each training epoch after this many batches (per
                rank under torchrun).
            mixed_precision: ``"bf16"`` or ``"fp16"`` (with a gradient scaler) runs the
                training stages' forward passes in autocast; None trains in FP32.
            accumulate_grad_batches: batches whose gradients add up to one optimizer step.
            throughput_batch: batch size(s) of the throughput measurement; the first is the
                row's ``throughput``, all are in its ``throughput_by_batch``.
            resume: continue from the checkpoints an earlier, interrupted run of this
                pipeline left in ``output_dir``: the finished stages whose options are
                unchanged are not run again. The model and settings must be the same.
            runtimes: the ONNX runtimes that measure model.onnx and the final artifact, from
                ``("onnxruntime", "openvino")``; ONNX Runtime always does. Default: every
                one installed (OpenVINO with ``pip install 'compressor[openvino]'``).
            load_test: also load-test model.onnx and the final file under concurrent
                requests (`LoadTest`; True: its defaults, about a minute) and add the
                results to the report's ``load`` section.
            io: which output to compare and distil and the task (`ModelIO`); inferred from
                the model and the first training batch by default. The task picks the
                default loss and metric (top-1, or mIoU for segmentation). A model whose
                output is not a tensor runs wrapped in `SelectOutput`.
            full_evaluation: evaluate every row over the eval data in its own runtime. By
                default the baseline is evaluated once, as model.onnx in ONNX Runtime, and
                its torch row and other runtimes take that accuracy when their answers on a
                sample of the eval data are the same (the row's ``details.accuracy_from``
                says so); stage results and INT8 files are always evaluated in every runtime.

        Returns:
            `PipelineResult` with the compressed torch model, the INT8 ONNX path and the report.

        Raises:
            UserError: a bad argument, data set or model (the message says which and why).
        """
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module (got: {type(model).__name__})"
            raise UserError(msg)
        chosen_runtimes = check_runtimes(runtimes)
        check_training_options(mixed_precision, accumulate_grad_batches)
        if load_test is True:
            load_test = LoadTest()
        elif load_test is not False and not isinstance(load_test, LoadTest):
            msg = f"load_test must be True, False or a cz.LoadTest (got: {load_test!r})"
            raise UserError(msg)
        parallel = distributed.setup()  # under torchrun: join its process group
        if parallel and self.max_search_minutes is not None:
            msg = (
                "max_search_minutes is not supported under torchrun yet: search in one "
                "process, then run the ratio it chose with torchrun"
            )
            raise UserError(msg)
        train_spec = as_data_spec(train_data, "train_data")
        model, io = resolve_data_io(io, model, train_spec)
        settings: dict[str, Any] = {
            "train_data": train_spec,
            "eval_data": as_data_spec(eval_data, "eval_data"),
            "loss_fn": loss_fn or io.loss_fn(),
            "eval_fn": eval_fn or io.eval_fn(),
            "io": io,
            "custom_metric": eval_fn is not None,
            "device": distributed.local_device(resolve_device(device)),
            "seed": _check_seed(seed),
            "threads": _check_threads(threads),
            "limit_train_batches": limit_train_batches,
            "mixed_precision": mixed_precision,
            "accumulate_grad_batches": accumulate_grad_batches,
            "throughput_batches": _batch_sizes(throughput_batch),
            "runtimes": chosen_runtimes,
            "full_evaluation": _check_flag("full_evaluation", full_evaluation),
        }
        if distributed.is_follower():  # trains with rank 0, writes nothing
            with tempfile.TemporaryDirectory(prefix="compressor-rank-") as scratch:
                ctx = RunContext(output_dir=Path(scratch), progress=False, **settings)
                trained, onnx, report, output = follow(self.stages, self.step_names(), model, ctx)
            met = report.budget["met"] if report.budget else None
            return PipelineResult(
                model=trained, onnx_path=onnx, report=report, output_dir=output, budget_met=met
            )
        try:
            result = self._lead(model, output_dir, settings, progress, resume, load_test)
        except Exception as exc:
            if parallel and not self._training:  # the others wait for a message: tell them
                distributed.send_error(exc)
            raise
        if parallel:
            send_result(result.model, result.onnx_path, result.report, result.output_dir)
        return result

    def _lead(
        self,
        model: nn.Module,
        output_dir: str | Path,
        settings: dict[str, Any],
        progress: bool,
        resume: bool,
        load_test: LoadTest | bool,
    ) -> PipelineResult:
        """`run` in one process, or on rank 0 of a data-parallel run."""
        self._training = False
        start = time.perf_counter()
        with run_folder(output_dir, resume=resume) as folder:
            ctx = RunContext(output_dir=folder.staging, progress=progress, **settings)
            state = self._run_stages(model, ctx, resume)
            budget = self._budget(state, ctx)
            if budget and not budget["met"]:
                state = _over_budget(state)
                budget["artifact"] = state.onnx_path.name if state.onnx_path else None
            load, load_s = None, 0.0
            if load_test:
                ctx.log("load test: model.onnx and the final file under concurrent requests")
                files = {"baseline": ctx.output_dir / "model.onnx"}
                if state.onnx_path and state.onnx_path.name != "model.onnx":
                    files["final"] = state.onnx_path
                say = ctx.log if ctx.progress else None
                shape = describe(state.example_input)[0]["shape"]  # e.g. the sequence length
                load_started = time.perf_counter()
                load = load_test.run(files, ctx.threads, progress=say, input_shape=shape)
                load_s = time.perf_counter() - load_started
            parity_started = time.perf_counter()
            parity = final_parity(state, ctx)
            more = {"measuring": time.perf_counter() - parity_started, "load_test": load_s}
            phases = {
                step: s.phase or s.name
                for step, s in zip(self.step_names(), self.stages, strict=True)
            }
            report = Report(
                rows=list(state.rows),
                environment=environment(ctx.threads),
                parity=parity,
                seconds=phase_seconds(
                    state.rows, phases, total=time.perf_counter() - start, **more
                ),
                load_test=load,
                budget=budget,
                model_io={
                    **ctx.io.to_dict(custom_metric=ctx.custom_metric),
                    "inputs": describe(state.example_input),
                },
            )
            report.save(ctx.output_dir)
            checkpoints = [
                checkpoint_path(ctx, i, step).relative_to(ctx.output_dir).as_posix()
                for i, step in enumerate(self.step_names())
            ]
            files = ["model.onnx", *REPORT_FILES, *checkpoints]
            if ctx.io.detection is not None:  # what decodes the ONNX files' output
                ctx.io.detection.save(ctx.output_dir / HEAD_FILE)
                files.append(HEAD_FILE)
            folder.promote(files + ([state.onnx_path.name] if state.onnx_path else []))
        onnx_path = folder.output / state.onnx_path.name if state.onnx_path else None
        ctx.log(f"done: {folder.output}")
        return PipelineResult(
            model=state.model,
            onnx_path=onnx_path,
            report=report,
            output_dir=folder.output,
            budget_met=budget["met"] if budget else None,
        )

    def _budget(self, state: State, ctx: RunContext) -> dict[str, Any] | None:
        """The final row against the baseline under ``max_accuracy_drop``, when set."""
        if self.max_accuracy_drop is None:
            return None
        base, final = state.rows[0].accuracy, state.rows[-1].accuracy
        drop = None if base is None or final is None else round(base - final, 6)
        met = drop is not None and drop <= self.max_accuracy_drop + 1e-9
        if not met:
            ctx.log(
                f"accuracy budget missed: lost {drop} against a budget of {self.max_accuracy_drop}"
            )
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "baseline_accuracy": base,
            "final_accuracy": final,
            "accuracy_drop": drop,
            "met": met,
        }

    def _run_stages(self, model: nn.Module, ctx: RunContext, resume: bool) -> State:
        """Run the stages (after those a resumed run finished), checkpointing each."""
        _check_weights(model)
        fingerprint = model_fingerprint(model)
        settings = resume_settings(ctx)
        settings.update(self.options())  # the budget changes what the INT8 stage writes
        done, state = (
            finished_stages(self.stages, self.step_names(), model, ctx, fingerprint, settings)
            if resume
            else (0, None)
        )
        if state is None:
            state = start_state(model, ctx)
        if self.max_accuracy_drop is not None and state.rows[0].accuracy is not None:
            ctx = dataclasses.replace(
                ctx, min_accuracy=state.rows[0].accuracy - self.max_accuracy_drop
            )
        searched: dict[int, tuple[State, float]] = {}
        for index, (stage, step) in enumerate(zip(self.stages, self.step_names(), strict=True)):
            if index < done:
                continue
            if self._search_span and index == self._search_span[0]:
                assert self.max_accuracy_drop is not None and self.max_search_minutes is not None
                searched = search_pruning_ratio(
                    self.stages,
                    self._search_span,
                    state,
                    ctx,
                    self._apply,
                    self.max_accuracy_drop,
                    self.max_search_minutes,
                )
            ctx.log(f"stage {index + 1}/{len(self.stages)}: {step}")
            if index in searched:  # the chosen candidate's run of this stage
                found, stage_s = searched.pop(index)
                state = found.replace(rows=state.rows)
            else:
                state, stage_s = self._apply(index, state, ctx)
            row = measure_step(stage, step, state, ctx)
            row = dataclasses.replace(row, seconds={"stage": round(stage_s, 2), **row.seconds})
            others = []
            if index == len(self.stages) - 1 and row.runtime == "onnxruntime" and state.onnx_path:
                # the final file in the other runtimes, just before its own (last) row
                others = in_other_runtimes(state.onnx_path, row, ctx)
            state = state.replace(rows=(*state.rows, *others, row))
            save_checkpoint(
                checkpoint_path(ctx, index, step),
                state.model,
                step=step,
                stage={stage.name: stage.to_dict()},
                extra={
                    "rows": [r.to_dict() for r in state.rows],
                    "onnx_path": state.onnx_path.name if state.onnx_path else None,
                    "model_fingerprint": fingerprint,
                    "settings": settings,
                },
            )
        return state

    def _apply(
        self, index: int, state: State, ctx: RunContext, stages: Sequence[Stage] | None = None
    ) -> tuple[State, float]:
        """Run stage ``index`` of ``stages`` (the pipeline's; a search candidate's) on
        ``state`` (data-parallel when it trains under torchrun); the next state and the
        seconds it took."""
        stages = self.stages if stages is None else stages
        stage, step = stages[index], self.step_names()[index]
        step_ctx = dataclasses.replace(ctx, step=step, upcoming=tuple(stages[index + 1 :]))
        parallel = stage.trains and distributed.active()
        if parallel:  # the other ranks train this stage with rank 0
            send_state(index, state)
        torch.manual_seed(ctx.seed)  # each stage starts from the seed: resume is exact
        ctx.train_data.reseed(ctx.seed)
        start = time.perf_counter()
        self._training = parallel
        state = stage.apply(state.replace(details={}), step_ctx)
        if parallel:
            state = _with_ranks(state, in_sync(state.model))
        self._training = False
        return state, time.perf_counter() - start


def _with_ranks(state: State, synced: bool) -> State:
    """The stage's details with the data-parallel run's size and whether ranks agree."""
    ranks = {"world_size": distributed.world_size(), "in_sync": synced}
    details = {**state.details, "data_parallel": ranks}
    if not synced:
        note = (
            f"{ranks['world_size']} ranks trained this stage, but their weights differ "
            "afterwards; rank 0's model goes on (a stage that is not deterministic per rank?)"
        )
        warnings.warn(note, stacklevel=2)
        details["notes"] = [*details.get("notes", []), note]
    return state.replace(details=details)


OVER_BUDGET = "model.int8.over-budget.onnx"


def _over_budget(state: State) -> State:
    """Rename the final INT8 file to `OVER_BUDGET` (in the staging folder), rows with it."""
    path = state.onnx_path
    if path is None or path.name != "model.int8.onnx":
        return state
    target = path.with_name(OVER_BUDGET)
    path.replace(target)
    rows = tuple(
        dataclasses.replace(r, details={**r.details, "file": OVER_BUDGET})
        if r.details.get("file") == path.name
        else r
        for r in state.rows
    )
    return state.replace(onnx_path=target, rows=rows)


def _check_order(stages: list[Stage]) -> None:
    """Refuse a torch stage after an ONNX Runtime one: the artifact would not be the final model.

    A stage that works on the torch model (pruning, training) after INT8 quantization would
    change a model that no file describes any more, while the INT8 file on disk is the model
    before it.
    """
    onnx_stage = next((s for s in stages if s.runtime == "onnxruntime"), None)
    if onnx_stage is None:
        return
    later = stages[stages.index(onnx_stage) + 1 :]
    torch_stage = next((s for s in later if s.runtime == "torch"), None)
    if torch_stage is not None:
        msg = (
            f"stage {torch_stage.name!r} changes the torch model after {onnx_stage.name!r} "
            f"has written the ONNX artifact, which would then describe an older model; "
            f"put {torch_stage.name!r} before {onnx_stage.name!r}"
        )
        raise RecipeError(msg)


def _batch_sizes(value: int | Sequence[int]) -> tuple[int, ...]:
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        msg = f"throughput_batch must be a positive int or a list of them (got: {value!r})"
        raise UserError(msg)
    return sizes


def _check_weights(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite weights: nothing after could mean anything."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            msg = (
                f"the model's {name!r} holds NaN or infinite values; load weights from a run "
                "that did not diverge"
            )
            raise ModelError(msg)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False (got: {value!r})")
    return value


def _check_threads(threads: Any) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        msg = f"threads must be a positive int, or None for all cores (got: {threads!r})"
        raise UserError(msg)
    return threads


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        msg = f"seed must be an int >= 0 (got: {seed!r})"
        raise UserError(msg)
    return seed
