"""Flags and checks several subcommands share."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..errors import UserError
from ..runtime.runtimes import ONNX_RUNTIMES

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
  compressor export triton runs/demo/model.int8.onnx --output model_repository
"""


def add_runtime(group: Any) -> None:
    group.add_argument(
        "--runtime",
        nargs="+",
        choices=ONNX_RUNTIMES,
        metavar="NAME",
        help="ONNX runtimes to measure in: onnxruntime, openvino (default: every one "
        "installed; ONNX Runtime always)",
    )


def add_batching(parser: argparse.ArgumentParser, max_batch: int, max_wait: float) -> None:
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


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            msg = f"--{name.replace('_', '-')} must be >= 1 (got: {value})"
            raise UserError(msg)


def replicas_range(replicas: int, autoscale: str | None) -> tuple[int, int]:
    """(min, max) replicas: ``--autoscale MIN:MAX`` when given, else ``--replicas`` both."""
    if not autoscale:
        return replicas, replicas
    match = re.fullmatch(r"(\d+):(\d+)", autoscale)
    if not match:
        raise UserError(f"--autoscale must be MIN:MAX, e.g. 1:4 (got: {autoscale!r})")
    return int(match[1]), int(match[2])
