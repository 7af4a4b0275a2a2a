"""The `compressor` command: a thin layer over the Python API.

``compress`` runs the pipeline on a model and data named by specs (see `sources`),
``report`` re-renders a report, ``bench`` measures ONNX files. User errors print one line
and exit with status 2; ``--debug`` shows their traceback. A run that finished but missed
its accuracy budget (``--max-accuracy-drop``) exits with status 3 (`OVER_BUDGET_STATUS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import NO_SPACE
from .errors import UserError
from .pipeline.output_folder import LOCK_NAME, STAGING_NAME, run_folder
from .runtime.runtimes import ONNX_RUNTIMES

OVER_BUDGET_STATUS = 3

EXAMPLES = """examples:
  compressor compress                          # the embedded demo, no download
  compressor compress --model torchvision:resnet18 --num-classes 10 \\
      --data imagefolder:~/data/imagenette --recipe balanced --output runs/r18
  compressor compress --model mynet.py:build --weights mynet.pt --data cifar10:~/data \\
      --recipe recipe.yaml --ratio 0.6 --epochs 2 --output runs/mynet
  compressor compress --recipe fast --print-recipe   # the resolved recipe, then exit
  compressor report runs/demo/report.json      # re-render report.md and report.html
  compressor bench runs/demo/model.onnx runs/demo/model.int8.onnx --batch-sizes 1 32
  compressor load runs/demo/model.onnx runs/demo/model.int8.onnx --concurrency 1 8 32
  compressor serve runs/demo/model.int8.onnx --port 8000 --max-batch 16 --max-wait-ms 2
"""


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `compressor` command."""
    parser = argparse.ArgumentParser(
        prog="compressor",
        description="Take a trained PyTorch model to a small, fast INT8 ONNX file, with a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    _add_compress(commands, common)
    _add_report(commands, common)
    _add_bench(commands, common)
    _add_load(commands, common)
    _add_serve(commands, common)
    return parser


def _add_compress(commands: Any, common: argparse.ArgumentParser) -> None:
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
    _add_runtime(run)
    run.add_argument(
        "--load-test",
        action="store_true",
        help="also load-test model.onnx and the final file under concurrent requests "
        "(1 to 64 clients, with and without dynamic batching; about a minute) and add the "
        "results to the report",
    )
    compress.set_defaults(func=_compress)


def _add_runtime(group: Any) -> None:
    group.add_argument(
        "--runtime",
        nargs="+",
        choices=ONNX_RUNTIMES,
        metavar="NAME",
        help="ONNX runtimes to measure in: onnxruntime, openvino (default: every one "
        "installed; ONNX Runtime always)",
    )


def _add_report(commands: Any, common: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report",
        parents=[common],
        help="re-render report.md and report.html from a report.json",
        description="Read OUTPUT/report.json, print its table and write report.md and "
        "report.html beside it again (the diagnosis is recomputed).",
    )
    report.add_argument("path", type=Path, help="a report.json, or the output folder holding it")
    report.add_argument(
        "--accuracy-threshold",
        type=float,
        metavar="F",
        help="warn when accuracy falls by more than F (a fraction; default: the report's)",
    )
    report.set_defaults(func=_report)


def _add_bench(commands: Any, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="measure ONNX files with the report's code and print the same table",
        description="Measure one or more ONNX files in every installed ONNX runtime (or those "
        "--runtime names), side by side, on seeded random inputs: p50/p95 latency at the "
        "first batch size, throughput at the others.",
    )
    bench.add_argument("models", nargs="+", type=Path, metavar="MODEL.onnx")
    bench.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[1, 32],
        metavar="N",
        help="latency at the first, throughput at the rest (default: 1 32)",
    )
    bench.add_argument(
        "--threads", type=int, metavar="N", help="runtime threads (default: all cores)"
    )
    bench.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="input shape without the batch axis, for models whose shape is dynamic",
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_runtime(bench)
    bench.set_defaults(func=_bench)


def _add_batching(parser: argparse.ArgumentParser, max_batch: int, max_wait: float) -> None:
    parser.add_argument(
        "--max-batch",
        type=int,
        default=max_batch,
        metavar="N",
        help=f"most rows the dynamic batcher runs at once (default: {max_batch}; 1: no batching)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=max_wait,
        metavar="MS",
        help=f"longest a request waits for others to join its batch (default: {max_wait:g})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="most requests waiting; more get 'busy' (HTTP 503) (default: 256)",
    )


def _add_load(commands: Any, common: argparse.ArgumentParser) -> None:
    load = commands.add_parser(
        "load",
        parents=[common],
        help="closed-loop load test of ONNX files (or of a running server) at several "
        "concurrency levels",
        description="N clients each send one request (one row) at a time and wait for the "
        "answer, at each concurrency level, bounded in requests and seconds. By default each "
        "file runs in this process under four settings: one session with every core and one "
        "session per core, each without batching and with the dynamic batcher. Per level: "
        "throughput, p50/p90/p95/p99 latency, rows per run, queue vs run time, and a queueing "
        "estimate. With --url, the clients talk to a running server over HTTP instead.",
    )
    load.add_argument("models", nargs="*", type=Path, metavar="MODEL.onnx")
    load.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16, 32, 64],
        metavar="N",
        help="client counts (default: 1 2 4 8 16 32 64)",
    )
    load.add_argument(
        "--requests", type=int, default=400, metavar="N", help="requests per level (default: 400)"
    )
    load.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="longest a level runs (default: 5)",
    )
    load.add_argument(
        "--p99-ms",
        type=float,
        default=50.0,
        metavar="MS",
        help="the latency bound the best setting must keep (default: 50)",
    )
    load.add_argument(
        "--threads", type=int, metavar="N", help="cores to split between sessions (default: all)"
    )
    load.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="the dynamic batcher's largest batch (default: 32)",
    )
    load.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="input shape without the batch axis, for models whose shape is dynamic",
    )
    load.add_argument(
        "--runtime",
        nargs="+",
        default=["onnxruntime"],
        choices=ONNX_RUNTIMES,
        metavar="NAME",
        help="run the files in these runtimes: onnxruntime, openvino (default: onnxruntime)",
    )
    load.add_argument("--url", metavar="URL", help="load a running server (http://HOST:PORT)")
    load.add_argument("--name", help="the model's name on the server (with --url)")
    load.add_argument(
        "--json-tensors",
        action="store_true",
        help="with --url, send tensors as JSON lists instead of the binary extension",
    )
    load.add_argument("--json", action="store_true", help="print the results as JSON")
    load.set_defaults(func=_load)


def _add_serve(commands: Any, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve an ONNX file over HTTP (KServe V2 / Triton protocol) with dynamic batching",
        description="Serve MODEL.onnx with the Open Inference Protocol's REST form "
        "(GET /v2/health/live, /v2/health/ready, /v2/models/NAME; POST "
        "/v2/models/NAME/infer, JSON or binary tensors), behind a dynamic batcher with a "
        "bounded queue. Ctrl-C or SIGTERM stops it after the requests in flight finish. "
        "Needs the serve extra: pip install 'compressor[serve]'.",
    )
    serve.add_argument("model", type=Path, metavar="MODEL.onnx")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; the server has "
        "no authentication, so put a proxy in front before listening elsewhere)",
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port (default: 8000; 0: any free one)"
    )
    serve.add_argument("--name", help="the model's name in URLs (default: the file's stem)")
    serve.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=ONNX_RUNTIMES,
        help="the runtime behind the server: onnxruntime (default) or openvino "
        "(pip install 'compressor[openvino]')",
    )
    _add_batching(serve, 16, 2.0)
    serve.add_argument(
        "--max-rows",
        type=int,
        default=64,
        metavar="N",
        help="most rows one request may hold; larger ones get HTTP 400 (default: 64)",
    )
    serve.add_argument(
        "--sessions",
        type=int,
        default=1,
        metavar="N",
        help="ONNX Runtime sessions running batches side by side (default: 1)",
    )
    serve.add_argument(
        "--threads", type=int, metavar="N", help="intra-op threads per session (default: all "
        "cores divided by --sessions)"
    )  # fmt: skip
    serve.add_argument(
        "--stop-after-requests",
        type=int,
        metavar="N",
        help="stop after N infer requests (for scripts and tests)",
    )
    serve.add_argument("--stop-after-s", type=float, metavar="S", help="stop after S seconds")
    serve.set_defaults(func=_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        text = str(exc)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its own message
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(text.split())  # one line, whatever the message holds
        print(f"compressor: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        print(
            f"compressor: error: {exc.strerror} ({exc.filename or 'a temporary file'}): free "
            "space and rerun; a pipeline run continues with --resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "output", None)
        kept = f" in {where}" if where is not None else ""
        print(
            f"compressor: interrupted; the finished stages are kept{kept}: rerun the same "
            "command with --resume to continue from them",
            file=sys.stderr,
        )
        return 130


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
    from .models.model_io import resolve_io

    images, targets = next(iter(loader))
    return resolve_io(io, model, images, targets)


def _hf_from_config(spec: str) -> bool:
    """Whether ``spec`` is an hf: model built from a config (random weights)."""
    if not spec.startswith("hf:"):
        return False
    from .sources.hf_models import is_pretrained

    return not is_pretrained(spec.removeprefix("hf:"))


def _tokenizer(args: argparse.Namespace) -> str | None:
    """The tokenizer text data is encoded with: ``--tokenizer``, else a pretrained hf:
    model's own (its ids mean nothing in a word vocabulary's numbering)."""
    from .sources.hf_models import is_pretrained
    from .sources.specs import TEXT_KINDS

    text = args.data.partition(":")[0] in TEXT_KINDS
    if args.tokenizer or not text or not args.model.startswith("hf:"):
        return args.tokenizer
    name = args.model.removeprefix("hf:")
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        return None  # loading the model names the missing folder
    return name if is_pretrained(name) else None


def _compress(args: argparse.Namespace) -> int:
    import torch

    from .models.checkpoints import load_checkpoint, save_checkpoint
    from .models.model_io import ModelIO
    from .pipeline.pipeline import Pipeline
    from .pipeline.recipe import recipe_to_yaml
    from .sources.specs import DataOptions, check_model_fits_data, load_data, load_model
    from .training import distributed
    from .training.loop import fit_baseline

    _check_positive(
        args, "threads", "limit_train_batches", "num_classes", "accumulate_grad_batches"
    )
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
        tokenizer=_tokenizer(args),
    )
    train_loader, val_loader, info = load_data(args.data, options)
    io = ModelIO(task=_check_task(args.task, info))
    torch.manual_seed(args.seed)  # the same --seed gives the same initial weights
    new_head = (  # sized to the data
        args.model == "demo" or args.model.startswith("hf:") or info.task == "detection"
    )
    model = load_model(
        args.model,
        num_classes=args.num_classes or (info.num_classes if new_head else None),
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
    parallel = distributed.setup()  # under torchrun: rank 0 writes, every rank trains
    leader = not distributed.is_follower()
    progress = progress and leader
    output = _check_output(args.output, args.overwrite, args.resume) if leader else args.output
    epochs = args.baseline_epochs
    if epochs is None:
        epochs = 3 if args.model == "demo" and args.weights is None else 0
    random_weights = args.model.startswith("torchvision:") or _hf_from_config(args.model)
    if leader and epochs == 0 and args.weights is None and random_weights:
        print(
            f"compressor: warning: {args.model} has random weights and --baseline-epochs is 0; "
            "the report's accuracy will mean nothing (pass --weights or --baseline-epochs)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    with run_folder(output, resume=args.resume) if leader else contextlib.nullcontext() as folder:
        trained = folder.staging / "checkpoints" / "00_baseline.pt" if leader else None
        if leader and epochs and args.resume and trained.is_file():
            # the baseline trained by the interrupted run (CUDA training is not bit-exact)
            try:
                model, _ = load_checkpoint(trained, model)
            except UserError as exc:
                print(f"[compressor] resume: {exc}; training it again", file=sys.stderr)
                trained.unlink()
        train_baseline = bool(epochs) and not (leader and args.resume and trained.is_file())
        if parallel:  # rank 0 decides: every rank trains the baseline, or none does
            train_baseline = distributed.share(train_baseline)
        if train_baseline:
            if progress:
                print(
                    f"[compressor] baseline: training {args.model} for {epochs} epoch(s) on "
                    f"{info.train_samples} samples of {info.source}",
                    file=sys.stderr,
                )
            fit_baseline(
                model,
                train_loader,
                epochs=epochs,
                lr=args.baseline_lr,
                device=args.device,
                seed=args.seed,
                progress=progress,
                limit_train_batches=args.limit_train_batches,
                mixed_precision=args.mixed_precision,
                accumulate_grad_batches=args.accumulate_grad_batches,
                loss_fn=io.loss_fn(),
            )
            if leader:
                save_checkpoint(trained, model, step="baseline", stage={}, extra={"epochs": epochs})
        result = pipeline.run(
            model,
            train_loader,
            val_loader,
            output_dir=output,
            device=args.device,
            seed=args.seed,
            threads=args.threads,
            progress=progress,
            limit_train_batches=args.limit_train_batches,
            mixed_precision=args.mixed_precision,
            accumulate_grad_batches=args.accumulate_grad_batches,
            throughput_batch=args.throughput_batch,
            resume=args.resume,
            runtimes=args.runtime,
            load_test=args.load_test,
            io=io,
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

    from .errors import RecipeError
    from .pipeline.recipe import override_recipe, read_recipe
    from .sources.demo import DEMO_RECIPE

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


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            msg = f"--{name.replace('_', '-')} must be >= 1 (got: {value})"
            raise UserError(msg)


def _check_output(path: Path, overwrite: bool, resume: bool = False) -> Path:
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        msg = f"--output {str(path)!r} is a file; give a folder"
        raise UserError(msg)
    ours = {LOCK_NAME, STAGING_NAME}
    taken = path.is_dir() and any(p.name not in ours for p in path.iterdir())
    if taken and not resume and not overwrite:
        msg = (
            f"output folder {str(path)!r} is not empty; "
            "pass --overwrite (the old result is replaced when the new run has finished) "
            "or choose another --output"
        )
        raise UserError(msg)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".compressor-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        msg = f"cannot write to output folder {str(path)!r}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    return path


def _report(args: argparse.Namespace) -> int:
    from ._io import write_text
    from .report.report import Report

    path = args.path / "report.json" if args.path.is_dir() else args.path
    report = Report.load(path)
    if args.accuracy_threshold is not None:
        if not 0 <= args.accuracy_threshold < 1:
            msg = f"--accuracy-threshold must be in [0, 1) (got: {args.accuracy_threshold})"
            raise UserError(msg)
        report.accuracy_threshold = args.accuracy_threshold
    write_text(path.parent / "report.md", report.to_markdown())
    write_text(path.parent / "report.html", report.to_html())
    print(report.to_markdown())
    print(f"Wrote {path.parent / 'report.md'} and {path.parent / 'report.html'}.")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .report.bench import bench, bench_summary

    _check_positive(args, "threads")
    report = bench(
        args.models,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        input_shape=args.input_shape,
        runtimes=args.runtime,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report.to_markdown())
    speedups = bench_summary(report)
    if len(speedups) > 1:
        first = next(iter(speedups))
        shown = ", ".join(f"{name} {value:.2f}x" for name, value in speedups.items())
        print(f"p50 speedup vs {first}: {shown}")
    return 0


def _load(args: argparse.Namespace) -> int:
    from .runtime.load import default_settings, load_file, load_url, to_markdown

    _check_positive(args, "threads", "max_batch", "requests")
    if args.seconds <= 0 or args.p99_ms <= 0:
        msg = f"--seconds and --p99-ms must be > 0 (got: {args.seconds}, {args.p99_ms})"
        raise UserError(msg)
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    common = {
        "levels": args.concurrency,
        "max_requests": args.requests,
        "max_seconds": args.seconds,
        "input_shape": args.input_shape,
        "p99_ms": args.p99_ms,
        "progress": say,
    }
    if args.url:
        if args.models or not args.name:
            msg = "--url loads a server: give the model's --name, and no MODEL.onnx"
            raise UserError(msg)
        results = [load_url(args.url, args.name, binary=not args.json_tensors, **common)]
    elif not args.models:
        msg = "give one or more MODEL.onnx files, or --url and --name of a running server"
        raise UserError(msg)
    else:
        settings = default_settings(args.threads, args.max_batch, args.runtime)
        results = [load_file(m, settings=settings, **common) for m in args.models]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(to_markdown(results))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .runtime.batching import BatchSettings
    from .runtime.measure import default_threads
    from .runtime.serve import serve

    _check_positive(args, "sessions", "threads", "max_batch", "max_queue", "max_rows")
    threads = args.threads or max(1, default_threads() // args.sessions)
    settings = BatchSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        sessions=args.sessions,
        threads=threads,
        max_queue=args.max_queue,
        max_rows=args.max_rows,
        runtime=args.runtime,
    )

    def ready(url: str) -> None:
        name = args.name or args.model.stem
        print(
            f"compressor: serving {name} at {url}/v2/models/{name} ({settings.label}); "
            "Ctrl-C stops",
            flush=True,
        )

    answered = serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        settings=settings,
        stop_after_requests=args.stop_after_requests,
        stop_after_s=args.stop_after_s,
        on_ready=ready,
    )
    print(f"compressor: stopped after {answered} infer request(s)", flush=True)
    return 0


def _version() -> str:
    from ._version import __version__

    return f"compressor {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
