"""Where the time goes: ONNX Runtime's per-node kernel times, FP32 export vs compressor's INT8.

Builds a torchvision model (random weights, 224x224), optionally prunes it, exports it and
quantizes it with compressor's Int8Quantization stage, then runs each file with ONNX Runtime's
profiler on (same threads and graph optimisation level as compressor's measurements) and prints
the time per op type and the slowest nodes, in microseconds per call.

    python benchmarks/op_profile.py resnet18
    python benchmarks/op_profile.py resnet18 --ratio 0.5

Or profile ONNX files you have, of one float image input, at a chosen size (their height and
width are made dynamic first, so a fully convolutional file runs at any size; a run's
``model.onnx`` and ``model.int8.onnx``, say):

    python benchmarks/op_profile.py --files runs/x/model.onnx runs/x/model.int8.onnx --size 96

Profiling adds a little overhead per node; use it to see shares, latency.py for speed. Each
file's batch-1 p50 without the profiler is printed too (median of 3 runs of ``--runs`` calls).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_data, compressor_int8

import compressor as cz
from compressor.pruning.engine import prune
from compressor.runtime.export import export_onnx


def _session(path: Path, threads: int, profile_prefix: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input(session, size: int) -> dict[str, np.ndarray]:
    first = session.get_inputs()[0]
    channels = first.shape[1] if isinstance(first.shape[1], int) else 3
    x = np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)
    return {first.name: x}


def profile(
    path: Path, threads: int, runs: int, tmp: Path, size: int = 224
) -> tuple[dict, dict, dict]:
    """Mean kernel time per op type and per node, in microseconds per call, and the number
    of nodes per op type."""
    session = _session(path, threads, tmp / path.stem)
    feed = _input(session, size)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    nodes: dict[str, set] = collections.defaultdict(set)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op, node = event["args"]["op_name"], event["name"].removesuffix("_kernel_time")
            by_op[op] += event["dur"] / runs
            by_node[node] += event["dur"] / runs
            nodes[op].add(node)
    return dict(by_op), dict(by_node), {op: len(n) for op, n in nodes.items()}


def p50_ms(path: Path, threads: int, runs: int, size: int) -> float:
    """Batch-1 latency without the profiler: the median of 3 runs' medians, in ms."""
    session = _session(path, threads)
    feed = _input(session, size)
    for _ in range(max(10, runs // 10)):
        session.run(None, feed)
    medians = []
    for _ in range(3):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return 1e3 * float(np.median(medians))


def dynamic_size(path: Path, out: Path) -> Path:
    """A copy of ``path`` whose first input has symbolic height and width (and no stale
    intermediate shapes), so it runs at any image size."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims[2:], ("height", "width"), strict=False):
        dim.dim_param = name
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim[1:]:
            dim.ClearField("dim_value")
    del model.graph.value_info[:]
    onnx.save(model, str(out))
    return out


def report(label: str, path: Path, args: argparse.Namespace, tmp: Path, size: int) -> None:
    by_op, by_node, count = profile(path, args.threads, args.runs, tmp, size)
    total = sum(by_op.values())
    p50 = p50_ms(path, args.threads, args.runs, size)
    print(f"\n{label}: {total:.0f} us of kernel time per call; p50 {p50:.3f} ms at batch 1")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:28} {us:8.0f} us  {100 * us / total:5.1f}%  {count[op]:4d} nodes")
    print(f"  slowest {args.top} nodes:")
    for node, us in sorted(by_node.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"    {node:60} {us:8.0f} us")


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.0, help="prune first (0: don't)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--files", nargs="+", type=Path, help="profile these ONNX files")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    args = parser.parse_args()
    if args.files:
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            parser.error(f"no such ONNX file: {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix="profile-") as tmp_name:
            tmp = Path(tmp_name)
            for index, path in enumerate(args.files):
                sized = dynamic_size(path, tmp / f"{index}_{path.name}")
                report(f"{path} at {args.size}x{args.size}", sized, args, tmp, args.size)
        return 0

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
            report(f"{args.model} {label}", path, args, tmp, 224)
    return 0


if __name__ == "__main__":
    sys.exit(main())
