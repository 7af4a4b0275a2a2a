"""Where the time goes: ONNX Runtime's per-node kernel times, FP32 export vs compressor's INT8.

Builds a torchvision model (random weights, 224x224), optionally prunes it, exports it and
quantizes it with compressor's Int8Quantization stage, then runs each file with ONNX Runtime's
profiler on (same threads and graph optimisation level as compressor's measurements) and prints
the time per op type and the slowest nodes, in microseconds per call.

    python benchmarks/op_profile.py resnet18
    python benchmarks/op_profile.py resnet18 --ratio 0.5

Profiling adds a little overhead per node; use it to see shares, latency.py for speed.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_data, compressor_int8

import compressor as cz
from compressor.export import export_onnx
from compressor.pruning import prune


def profile(path: Path, threads: int, runs: int, tmp: Path) -> tuple[dict, dict]:
    """Mean kernel time per op type and per node, in microseconds per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for _ in range(runs):
        session.run(None, {"input": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / runs
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"] / runs
    return dict(by_op), dict(by_node)


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.0, help="prune first (0: don't)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    example = torch.randn(1, 3, 224, 224)
    if args.ratio:
        model, _ = prune(copy.deepcopy(model), example, cz.StructuredPruning(ratio=args.ratio))
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp_name:
        tmp = Path(tmp_name)
        export_onnx(model, example, tmp / "fp32.onnx", threads=args.threads)
        int8, _ = compressor_int8(model, example, calibration_data(224, 32), tmp, args.threads)
        for label, path in (("FP32", tmp / "fp32.onnx"), ("INT8", int8)):
            by_op, by_node = profile(path, args.threads, args.runs, tmp)
            total = sum(by_op.values())
            print(f"\n{args.model} {label}: {total:.0f} us of kernel time per call")
            for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
                print(f"  {op:28} {us:8.0f} us  {100 * us / total:5.1f}%")
            print(f"  slowest {args.top} nodes:")
            for node, us in sorted(by_node.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"    {node:60} {us:8.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
