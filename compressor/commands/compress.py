"""compressor compress: run the pipeline on a model and data named by specs, with a recipe and
its override flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import EXAMPLES, add_runtime, check_positive

OVER_BUDGET_STATUS = 3


# Shortcut flags: flag -> recipe key they set (``option`` = every stage that takes it).
_OVERRIDES = {
    "epochs": ("epochs", int, "epochs of every training stage"),
    "lr": ("lr", float, "learning rate of every training stage"),
    "l1": ("sparsity_training.l1", float, "sparsity penalty"),
    "ratio": ("structured_pruning.ratio", float, "share of channels to prune"),
    "importance": ("structured_pruning.importance", str, "channel importance criterion"),
    "round_to": ("structured_pruning.round_to", int, "round pruned widths to a multiple"),
    "temperature": ("distillation.temperature", float, "distillation temperature"),
    "alpha": ("distillation.alpha", float, "weight of the soft-target loss"),
    "calibration_samples": ("int8_quantization.calibration_samples", int, "INT8 calibration"),
    "calibration_method": ("int8_quantization.method", str, "minmax, entropy or percentile"),
    "target_macs": (
        "structured_pruning.target_macs",
        lambda text: text,  # a number or 150M/1.2G; the stage parses and names bad ones
        "prune to at most this many MACs, e.g. 150M, instead of --ratio",
    ),
    "target_params": (
        "structured_pruning.target_params",
        lambda text: text,
        "prune to at most this many parameters, e.g. 2M, instead of --ratio",
    ),
    "target_size_mb": (
        "structured_pruning.target_size_mb",
        float,
        "prune until the INT8 file is at most this many MB, instead of --ratio",
    ),
    "target_latency_ms": (
        "structured_pruning.target_latency_ms",
        float,
        "prune until the INT8 file's batch-1 p50 here is at most this many ms, instead of --ratio",
    ),
    "max_accuracy_drop": (
        "max_accuracy_drop",
        float,
        "accuracy budget, a fraction: exit 3 and model.int8.over-budget.onnx when missed",
    ),
    "max_search_minutes": (
        "max_search_minutes",
        float,
        "with --max-accuracy-drop: search the pruning ratio for the most pruned model within "
        "the budget, for at most this many minutes",
    ),
}


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    compress = commands.add_parser(
        "compress",
        parents=[common],
        help="run the compression pipeline (with no options: the embedded demo)",
        description="Run sparsity training, structured pruning, distillation and INT8\n"
        "quantization on a model, then write the INT8 ONNX file and a report. With no\n"
        "--model and --data it trains the embedded demo model on the embedded\n"
        "Fashion-MNIST subset first (no download).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = compress.add_argument_group("model")
    model.add_argument(
        "--model",
        default="demo",
        metavar="SPEC",
        help="torchvision:NAME, hf:NAME (a Hugging Face preset bert-tiny, bert-mini, "
        "distilbert-tiny, vit-tiny, a config.json, a model folder or a Hub name), "
        "path/to/file.py:factory, package.module:factory, a pickled module file (with "
        "--trust-pickle), or demo (default)",
    )
    model.add_argument("--num-classes", type=int, metavar="N", help="classes of the model's head")
    model.add_argument(
        "--task",
        choices=TASK_CHOICES,
        help="what the model does (default: inferred from --data; demo-seg and "
        "fashion-mnist-seg are segmentation, demo-det and fashion-mnist-det detection, the "
        "others classification)",
    )
    model.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="a state_dict (or compressor checkpoint) to load into the model",
    )
    model.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled files (running code from them); off: torch.load(weights_only=True)",
    )
    model.add_argument(
        "--baseline-epochs",
        type=int,
        metavar="N",
        help="train the model N epochs before compressing (default: 3 for the demo model, else 0)",
    )
    model.add_argument(
        "--baseline-lr", type=float, default=0.05, metavar="LR", help="(default: 0.05)"
    )
    data = compress.add_argument_group("data")
    data.add_argument(
        "--data",
        default="demo",
        metavar="SPEC",
        help="imagefolder:DIR, fashion-mnist:DIR, mnist:DIR, cifar10:DIR, "
        "demo-seg, fashion-mnist-seg:DIR (segmentation), demo-det, fashion-mnist-det:DIR "
        "(detection), text-demo, text:DIR (DIR/train.tsv "
        "and DIR/val.tsv of label<TAB>text lines), or demo (default)",
    )
    data.add_argument(
        "--seq-len", type=int, metavar="N", help="text: tokens per sample (default: 128)"
    )
    data.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="text: a Hugging Face tokenizer (a folder or a Hub name) that makes the token "
        "ids (default: an --model hf:DIR or hf:org/name model's own; else a word vocabulary "
        "of the training text)",
    )
    data.add_argument("--download", action="store_true", help="fetch a torchvision data set")
    data.add_argument("--input-size", type=int, metavar="PX", help="resize images to PX x PX")
    data.add_argument(
        "--channels", type=int, metavar="C", help="1 or 3: convert images (default: the data's)"
    )
    data.add_argument(
        "--mean", type=float, nargs="+", metavar="X", help="normalisation mean per channel"
    )
    data.add_argument(
        "--std", type=float, nargs="+", metavar="X", help="normalisation std per channel"
    )
    data.add_argument("--batch-size", type=int, metavar="N", help="(default: 64; imagefolder 32)")
    data.add_argument("--workers", type=int, default=0, metavar="N", help="data loader workers")
    data.add_argument(
        "--val-split",
        type=float,
        default=0.2,
        metavar="F",
        help="imagefolder without train/ and val/: the share held out (default: 0.2)",
    )
    recipe = compress.add_argument_group(
        "recipe", "flags below override the recipe; docs/concepts.md lists every option"
    )
    recipe.add_argument(
        "--recipe",
        metavar="FILE|PRESET",
        help="YAML recipe or a preset: fast, balanced, max-compression (default: balanced; "
        "the demo model: the demo recipe)",
    )
    recipe.add_argument(
        "--print-recipe", action="store_true", help="print the resolved recipe and exit"
    )
    for flag, (key, kind, text) in _OVERRIDES.items():
        recipe.add_argument(
            f"--{flag.replace('_', '-')}",
            type=kind,
            default=None,
            metavar={int: "N", float: "X", str: "NAME"}.get(kind, "N"),
            help=f"{text} ({key})",
        )
    recipe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.OPTION=VALUE",
        help="set any option (repeatable), e.g. --set distillation.lr=0.005",
    )
    out = compress.add_argument_group("output")
    out.add_argument(
        "--output",
        type=Path,
        default=Path("runs/demo"),
        metavar="DIR",
        help="output folder (default: runs/demo)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the result in a non-empty output folder once the new run has finished",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output from its last finished stage "
        "(same model, data, recipe and settings)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    out.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    run = compress.add_argument_group("run")
    run.add_argument("--device", help="training device: cpu, cuda, cuda:N (default: cuda if any)")
    run.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of data order and training"
    )
    run.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for measuring (default: all)"
    )
    run.add_argument(
        "--limit-train-batches",
        type=int,
        metavar="N",
        help="stop each training epoch after N batches (quick trials; per rank under torchrun)",
    )
    run.add_argument(
        "--mixed-precision",
        choices=("bf16", "fp16"),
        help="train in autocast with this precision (fp16 with a gradient scaler)",
    )
    run.add_argument(
        "--accumulate-grad-batches",
        type=int,
        default=1,
        metavar="N",
        help="add up the gradients of N batches per optimizer step (default: 1)",
    )
    run.add_argument(
        "--throughput-batch",
        type=int,
        nargs="+",
        default=[32],
        metavar="N",
        help="batch size(s) of the throughput measurement (default: 32)",
    )
    add_runtime(run)
    run.add_argument(
        "--full-eval",
        action="store_true",
        help="evaluate every row over the eval data in its own runtime (default: the "
        "baseline once, in ONNX Runtime; its torch and OpenVINO rows take that accuracy when "
        "their answers on a sample are the same)",
    )
    run.add_argument(
        "--load-test",
        action="store_true",
        help="also load-test model.onnx and the final file under concurrent requests "
        "(1 to 64 clients, with and without dynamic batching; about a minute) and add the "
        "results to the report",
    )
    compress.set_defaults(func=_compress)


TASK_CHOICES = ("classification", "segmentation", "detection")


def _check_task(task: str | None, info: Any) -> str:
    """The task ``--task`` names, checked against the data's (one line each when not)."""
    if task is not None and task != info.task:
        msg = (
            f"--task {task} does not fit --data {info.source}, which is a {info.task} data set "
            "(demo-seg and fashion-mnist-seg:DIR are segmentation, demo-det and "
            "fashion-mnist-det:DIR detection, the others, text included, classification)"
        )
        raise UserError(msg)
    return info.task


def _dense_detector(model: Any, io: Any, loader: Any) -> tuple[Any, Any]:
    """A detector's dense part and its `ModelIO` (with the decoding head), from a batch."""
    from ..models.model_io import resolve_io

    images, targets = next(iter(loader))
    return resolve_io(io, model, images, targets)


def _compress(args: argparse.Namespace) -> int:
    import torch

    from ..models.model_io import ModelIO
    from ..pipeline.baseline import run_with_baseline
    from ..pipeline.output_folder import check_output
    from ..pipeline.pipeline import Pipeline
    from ..pipeline.recipe import recipe_to_yaml
    from ..sources.checks import check_model_fits_data
    from ..sources.data_specs import DataOptions, load_data
    from ..sources.model_specs import load_model, model_source, text_tokenizer
    from ..training import distributed

    check_positive(args, "threads", "limit_train_batches", "num_classes", "accumulate_grad_batches")
    if min(args.throughput_batch) < 1:
        msg = f"--throughput-batch sizes must be >= 1 (got: {args.throughput_batch})"
        raise UserError(msg)
    if args.baseline_epochs is not None and args.baseline_epochs < 0:
        msg = f"--baseline-epochs must be >= 0 (got: {args.baseline_epochs})"
        raise UserError(msg)
    pipeline = Pipeline.from_recipe(_resolve_recipe(args))
    if args.print_recipe:
        print(recipe_to_yaml(pipeline.stages, **pipeline.options()), end="")
        return 0
    progress = not args.quiet
    source = model_source(args.model, args.weights)
    options = DataOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        input_size=args.input_size,
        channels=args.channels,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        download=args.download,
        val_split=args.val_split,
        seed=args.seed,
        seq_len=args.seq_len,
        tokenizer=text_tokenizer(args.model, args.data, args.tokenizer),
    )
    train_loader, val_loader, info = load_data(args.data, options)
    io = ModelIO(task=_check_task(args.task, info))
    torch.manual_seed(args.seed)  # the same --seed gives the same initial weights
    sized_to_data = source.sized_to_data or info.task == "detection"
    model = load_model(
        args.model,
        num_classes=args.num_classes or (info.num_classes if sized_to_data else None),
        weights=args.weights,
        trust_pickle=args.trust_pickle,
        in_channels=info.channels,
        input_size=info.input_size,
        vocab_size=info.vocab_size,
    )
    check_model_fits_data(model, info)
    if info.task == "detection":  # its dense part trains, and the pipeline runs on it
        model, io = _dense_detector(model, io, train_loader)
    if args.resume and args.overwrite:
        msg = "--resume continues the run in --output and --overwrite starts anew: pass one"
        raise UserError(msg)
    distributed.setup()  # under torchrun: rank 0 writes, every rank trains
    leader = not distributed.is_follower()
    progress = progress and leader
    output = check_output(args.output, args.overwrite, args.resume) if leader else args.output
    epochs = source.baseline_epochs if args.baseline_epochs is None else args.baseline_epochs
    if leader and epochs == 0 and source.random_weights:
        print(
            f"compressor: warning: {args.model} has random weights and --baseline-epochs is 0; "
            "the report's accuracy will mean nothing (pass --weights or --baseline-epochs)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    result = run_with_baseline(
        pipeline,
        model,
        train_loader,
        val_loader,
        output_dir=output,
        baseline_epochs=epochs,
        baseline_lr=args.baseline_lr,
        loss_fn=io.loss_fn(),
        describe=f"{args.model} on {info.train_samples} samples of {info.source}",
        resume=args.resume,
        progress=progress,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        limit_train_batches=args.limit_train_batches,
        mixed_precision=args.mixed_precision,
        accumulate_grad_batches=args.accumulate_grad_batches,
        throughput_batch=args.throughput_batch,
        runtimes=args.runtime,
        load_test=args.load_test,
        io=io,
        full_evaluation=args.full_eval,
    )
    if not leader:  # rank 0 prints the report
        return 0
    if args.json:
        document = {
            "output_dir": str(result.output_dir),
            "onnx_path": str(result.onnx_path) if result.onnx_path else None,
            "seconds": round(time.perf_counter() - start, 1),
            **result.report.to_dict(),
        }
        print(json.dumps(document, indent=2))
        return _budget_status(result)
    print(result.report.to_markdown())
    print(f"Wrote {result.onnx_path or output} in {time.perf_counter() - start:.0f} s.")
    return _budget_status(result)


def _budget_status(result: Any) -> int:
    """0, or `OVER_BUDGET_STATUS` with the numbers on stderr when the budget was missed."""
    if result.budget_met is not False:
        return 0
    print(f"compressor: {result.report.budget_line()}", file=sys.stderr)
    return OVER_BUDGET_STATUS


def _resolve_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe named by --recipe (or the default), with the override flags applied."""
    import yaml

    from ..errors import RecipeError
    from ..pipeline.recipe import override_recipe, read_recipe
    from ..sources.demo import DEMO_RECIPE

    if args.recipe:
        recipe = read_recipe(args.recipe)
    elif args.model == "demo":
        recipe = DEMO_RECIPE
    else:
        recipe = read_recipe("balanced")
    targets = [f for f in _OVERRIDES if f.startswith("target_") and getattr(args, f) is not None]
    if args.ratio is not None:
        targets.insert(0, "ratio")
    if len(targets) > 1:
        flags = " and ".join(f"--{f.replace('_', '-')}" for f in targets)
        msg = f"{flags}: give one of them (a target searches the pruning ratio)"
        raise RecipeError(msg)
    for flag, (key, _, _) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            recipe = override_recipe(recipe, key, value)
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            msg = f"--set takes STAGE.OPTION=VALUE (got: {item!r})"
            raise RecipeError(msg)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            msg = f"--set {item!r}: the value is not valid YAML"
            raise RecipeError(msg) from exc
        recipe = override_recipe(recipe, key.strip(), value)
    return recipe
