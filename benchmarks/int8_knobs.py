"""What each INT8 choice buys: one knob changed at a time against compressor's defaults.

On one model (default resnet18, random weights, 224x224 or --input-size) and its
0.5-pruned copy, at batch 1:
the FP32 export and compressor's INT8 file (the reference), then ONNX Runtime's
quantize_static with one setting changed from compressor's: the graph optimisation level of
the session (EXTENDED lacks the NHWC layout rewrite of the INT8 convs, BASIC also the fusions),
no quant_pre_process, the first conv kept in FP32, per-tensor weights, symmetric (zero point
128) or int8 activations; and the pruned model at several channel roundings (round_to). All
are measured side by side in one group of five interleaved rounds.

    python benchmarks/int8_knobs.py
    python benchmarks/int8_knobs.py mobilenet_v2 --round-to 0 8 16 32
    python benchmarks/int8_knobs.py resnet18 --runtime openvino   # the same files in OpenVINO

With ``--runtime openvino`` every file runs in OpenVINO (compressor's settings); the ONNX
Runtime session knobs (graph optimisation levels) are left out there.

Prints a table and writes benchmarks/results/int8_knobs_MODEL.json (``_openvino`` added for
OpenVINO).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    calibration_data,
    calibration_reader,
    compressor_int8,
    print_table,
    side_by_side,
    write_results,
)

import compressor as cz
from compressor.pruning.engine import prune
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import count_params_macs, onnx_predictor
from compressor.runtime.runtimes import ONNX_RUNTIMES


def session(path: Path, threads: int, level: str = "ALL") -> Callable[[np.ndarray], Any]:
    """A CPU session at graph optimisation ``level``; returns a batch -> outputs call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})


def runner(path: Path, threads: int, runtime: str) -> Callable[[np.ndarray], Any]:
    """A batch -> outputs call of ``path`` in ``runtime`` (ONNX Runtime: all optimisations)."""
    if runtime == "onnxruntime":
        return session(path, threads)
    predict = onnx_predictor(path, threads, runtime)
    return lambda x: predict(torch.from_numpy(x))


def ort_int8(source: Path, out: Path, data: Any, **changes: Any) -> Path:
    """quantize_static with compressor's settings for a VNNI x86 CPU, except ``changes``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
    }
    quantize_static(str(source), str(out), calibration_reader(data), **(options | changes))
    return out


def knobs(
    model: torch.nn.Module,
    tag: str,
    tmp: Path,
    data: Any,
    threads: int,
    runtime: str,
    size: int = 224,
) -> dict[str, Any]:
    """Every knob's file (or session setting) for ``model`` at ``size``; name -> call."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.shape_inference import quant_pre_process

    example = torch.randn(1, 3, size, size)
    fp32, pre = tmp / f"{tag}.onnx", tmp / f"{tag}.pre.onnx"
    export_onnx(model, example, fp32, threads=threads)
    quant_pre_process(str(fp32), str(pre))
    ours, _ = compressor_int8(
        copy.deepcopy(model), example, data, tmp / tag, threads, ("onnxruntime", runtime)
    )
    first_conv = next(n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv")

    def run(path: Path) -> Callable[[np.ndarray], Any]:
        return runner(path, threads, runtime)

    variants = {"fp32": run(fp32), "int8 compressor (reference)": run(ours)}
    if runtime == "onnxruntime":
        variants |= {
            "fp32, graph level EXTENDED (no NCHWc layout)": session(fp32, threads, "EXTENDED"),
            "int8, graph level EXTENDED (no NHWC layout)": session(ours, threads, "EXTENDED"),
            "int8, graph level BASIC": session(ours, threads, "BASIC"),
        }
    variants |= {
        "int8 without quant_pre_process": run(ort_int8(fp32, tmp / f"{tag}.nopre.onnx", data)),
        "int8, first conv kept FP32": run(
            ort_int8(pre, tmp / f"{tag}.first.onnx", data, nodes_to_exclude=[first_conv])
        ),
        "int8, per-tensor weights": run(
            ort_int8(pre, tmp / f"{tag}.pt.onnx", data, per_channel=False)
        ),
        "int8, symmetric activations": run(
            ort_int8(
                pre, tmp / f"{tag}.sym.onnx", data, extra_options={"ActivationSymmetric": True}
            )
        ),
        "int8, int8 activations": run(
            ort_int8(pre, tmp / f"{tag}.s8.onnx", data, activation_type=QuantType.QInt8)
        ),
    }
    bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(fp32)).graph.node)
    print(f"{tag}: {bn} BatchNormalization nodes left in the export", file=sys.stderr)
    return variants


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, nargs="+", default=[0, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--input-size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runtime", default="onnxruntime", choices=ONNX_RUNTIMES)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    size = args.input_size
    example = torch.randn(1, 3, size, size)
    data = calibration_data(size, 64)
    x = np.random.default_rng(1).standard_normal((1, 3, size, size), dtype=np.float32)
    # Every variant in one interleaved group: this shared machine's speed drifts by tens of
    # percent over minutes, so only numbers measured side by side may be divided.
    calls: dict[tuple[str, str], Any] = {}
    macs: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="knobs-") as tmp_name:
        tmp = Path(tmp_name)
        pruned, _ = prune(copy.deepcopy(model), example, cz.StructuredPruning(ratio=args.ratio))
        for tag, m in (("full", model), (f"pruned {args.ratio}", pruned)):
            macs[tag] = count_params_macs(m, example)[1]
            found = knobs(m, tag.replace(" ", "_"), tmp, data, args.threads, args.runtime, size)
            for knob, call in found.items():
                calls[tag, knob] = call
        for round_to in args.round_to:
            options = cz.StructuredPruning(ratio=args.ratio, round_to=round_to or None)
            m, _ = prune(copy.deepcopy(model), example, options)
            tag = f"pruned {args.ratio}, round_to {round_to or 'none'}"
            macs[tag] = count_params_macs(m, example)[1]
            path, _ = compressor_int8(
                m, example, data, tmp / f"r{round_to}", args.threads, ("onnxruntime", args.runtime)
            )
            calls[tag, "int8 compressor"] = runner(path, args.threads, args.runtime)
        timings = side_by_side(
            {key: (lambda c=c: c(x)) for key, c in calls.items()}, rounds=args.rounds
        )
    fp32 = timings["full", "fp32"]["p50"]
    rows: list[dict[str, Any]] = []
    for (tag, knob), t in timings.items():
        ref = timings.get((tag, "int8 compressor (reference)"))
        rows.append(
            {"model": tag, "knob": knob, "macs": macs[tag], **t}
            | {
                "vs_reference": round(ref["p50"] / t["p50"], 2) if ref else None,
                "vs_fp32": round(fp32 / t["p50"], 2),
            }
        )
    print_table(
        rows,
        [
            ("model", "model"),
            ("variant", "knob"),
            ("MACs", "macs"),
            ("p50 ms", "p50"),
            ("p90 ms", "p90"),
            ("x vs compressor int8", "vs_reference"),
            ("x vs unpruned fp32", "vs_fp32"),
        ],
    )
    suffix = "" if args.runtime == "onnxruntime" else f"_{args.runtime}"
    out = args.out or Path(__file__).parent / "results" / f"int8_knobs_{args.model}{suffix}.json"
    summary = {"model": args.model, "runtime": args.runtime, "threads": args.threads}
    write_results(out, {**summary, "batch_size": 1}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
