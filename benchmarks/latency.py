"""Latency of standard architectures at 224x224: FP32, INT8, pruned + INT8, and the peers.

For each model (random weights; latency does not depend on them), in one process, with
fixed threads, these rows are measured side by side at each batch size:

- ``torch fp32``: torch eager, the model as given
- ``ort fp32``: its ONNX export in ONNX Runtime (all graph optimisations)
- ``ort int8 (compressor)``: compressor's Int8Quantization stage alone on the model
- ``pruned + int8 (compressor)``: StructuredPruning(ratio) then Int8Quantization, the
  pipeline's artifact without the training stages
- ``ort quantize_static default``: ONNX Runtime's quantize_static with its default options
- ``nncf``: nncf.quantize on the same FP32 ONNX file (when nncf is installed)
- ``openvino fp32``, ``openvino int8 (compressor)``, ``openvino pruned ...``: the same three
  compressor files run in OpenVINO (when ``compressor[openvino]`` is installed, or as
  ``--runtimes`` says), with the settings the report uses (compressor.runtime.runtimes)

Each cell is the median (and p90) of compressor's own timing loop (measure.timed_runs:
warm-up, then until the median settles), run for every row in turn, three interleaved
rounds, times pooled. Speedups are against ``ort fp32`` at the same batch size, and against
the fastest FP32 row (torch, ONNX Runtime or OpenVINO).

    pip install -r benchmarks/requirements.txt     # nncf, for the peer row
    python benchmarks/latency.py                   # resnet18 resnet50 mobilenet_v2, bs 1 and 16
    python benchmarks/latency.py resnet18 --batch-sizes 1 --no-peers
    python benchmarks/latency.py --batch-sizes 1 --no-peers --runtimes onnxruntime openvino

Prints a table and writes benchmarks/results/latency.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    calibration_data,
    compressor_int8,
    nncf_int8,
    ort_default_int8,
    print_table,
    side_by_side,
    write_results,
)

import compressor as cz
from compressor.pruning.engine import prune
from compressor.quantization.onnx_edits import inspect_int8_graph
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import (
    count_params_macs,
    onnx_predictor,
    torch_predictor,
    torch_threads,
)
from compressor.runtime.runtimes import check_runtimes

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
BASELINE = "ort fp32"


def bench_model(
    name: str,
    size: int,
    batch_sizes: list[int],
    threads: int,
    ratio: float,
    peers: bool,
    rounds: int,
    runtimes: tuple[str, ...] = ("onnxruntime",),
) -> list[dict[str, Any]]:
    """Build every variant of ``name`` and measure them side by side."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    example = torch.randn(1, 3, size, size)
    data = calibration_data(size, 64)
    params, macs = count_params_macs(model, example)
    built: list[tuple[str, Any, dict[str, Any]]] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        out = Path(tmp)
        base = {"params": params, "macs": macs}
        built.append(("torch fp32", torch_predictor(model), base))
        t0 = time.perf_counter()
        export_onnx(model, example, out / "fp32.onnx", threads=threads)
        seconds["export"] = time.perf_counter() - t0
        built.append((BASELINE, out / "fp32.onnx", base))
        t0 = time.perf_counter()
        int8, details = compressor_int8(
            copy.deepcopy(model), example, data, out / "int8", threads, runtimes
        )
        seconds["int8"] = time.perf_counter() - t0
        built.append(("ort int8 (compressor)", int8, {**base, **_placement(details)}))
        t0 = time.perf_counter()
        pruned, _ = prune(copy.deepcopy(model), example, cz.StructuredPruning(ratio=ratio))
        p_params, p_macs = count_params_macs(pruned, example)
        seconds["prune"] = time.perf_counter() - t0
        p_int8, details = compressor_int8(pruned, example, data, out / "pruned", threads, runtimes)
        built.append(
            (
                f"pruned {ratio} + int8 (compressor)",
                p_int8,
                {"params": p_params, "macs": p_macs, **_placement(details)},
            )
        )
        if peers:
            t0 = time.perf_counter()
            default = ort_default_int8(out / "fp32.onnx", data, out / "ort_default.onnx")
            seconds["ort_default"] = time.perf_counter() - t0
            built.append(("ort quantize_static default", default, base))
            t0 = time.perf_counter()
            nncf_file = nncf_int8(out / "fp32.onnx", data, out / "nncf.onnx")
            seconds["nncf"] = time.perf_counter() - t0
            if nncf_file is not None:
                built.append(("nncf.quantize", nncf_file, base))
        for runtime in runtimes[1:]:  # compressor's own files in the other runtimes
            ours = [b for b in built[1:4] if isinstance(b[1], Path)]
            built += [(f"{runtime} {_plain(v)}", (t, runtime), i) for v, t, i in ours]
        predictors, infos = {}, {}
        for variant, target, info in built:
            if isinstance(target, tuple):
                path, runtime = target
                predictors[variant] = onnx_predictor(path, threads, runtime)
                infos[variant] = {**info, "runtime": runtime, "size_bytes": path.stat().st_size}
            elif isinstance(target, Path):
                predictors[variant] = onnx_predictor(target, threads)
                infos[variant] = {**info, "runtime": "onnxruntime"}
                infos[variant]["size_bytes"] = target.stat().st_size
                if variant != BASELINE:
                    # What ONNX Runtime runs in INT8 and what stayed FP32, for every quantizer.
                    graph = inspect_int8_graph(target, threads, out / "optimized.onnx")
                    infos[variant] |= {
                        "int8_ops": graph["int8_compute_ops"],
                        "fp32_ops": len(graph["float_compute_ops"]),
                        "unfused_qdq": graph["unfused_qdq"],
                    }
            else:
                predictors[variant], infos[variant] = target, {**info, "runtime": "torch"}
        rows = []
        for batch in batch_sizes:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
            with torch_threads(threads):
                timings = side_by_side(
                    {v: (lambda p=p, x=x: p(x)) for v, p in predictors.items()}, rounds=rounds
                )
            for variant, timing in timings.items():
                rows.append(
                    {"model": name, "variant": variant, "batch_size": batch, **infos[variant]}
                    | timing
                )
                print(f"  {name} {variant} bs{batch}: {timing['p50']} ms", file=sys.stderr)
    fp32 = {"torch fp32", BASELINE, *(f"{r} fp32" for r in runtimes[1:])}
    for row in rows:
        same = [r for r in rows if r["batch_size"] == row["batch_size"]]
        ref = next(r for r in same if r["variant"] == BASELINE)
        fastest = min((r for r in same if r["variant"] in fp32), key=lambda r: r["p50"])
        row["speedup_vs_ort_fp32"] = round(ref["p50"] / row["p50"], 2)
        row["speedup_vs_fastest_fp32"] = round(fastest["p50"] / row["p50"], 2)
        row["fastest_fp32"] = fastest["variant"]
        row["build_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return rows


def _placement(details: dict[str, Any]) -> dict[str, Any]:
    """The nodes the INT8 stage kept in FP32, and what it timed to decide."""
    placement = details["quantization"]["placement"] or {}
    return {"fp32_nodes": placement.get("fp32_nodes", []), "placement": placement.get("tried")}


def _plain(variant: str) -> str:
    """The variant's name without its runtime: ``ort int8 (compressor)`` -> ``int8 (...)``."""
    return variant.removeprefix("ort ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--no-peers", action="store_true", help="skip ORT default and NNCF")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        help="ONNX runtimes for compressor's files (default: every installed one)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/latency.json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows += bench_model(
            name,
            args.input_size,
            args.batch_sizes,
            args.threads,
            args.ratio,
            not args.no_peers,
            args.rounds,
            check_runtimes(args.runtimes),
        )
    print_table(
        rows,
        [
            ("model", "model"),
            ("variant", "variant"),
            ("batch", "batch_size"),
            ("MACs", "macs"),
            ("p50 ms", "p50"),
            ("p90 ms", "p90"),
            ("x vs ORT FP32", "speedup_vs_ort_fp32"),
            ("x vs fastest FP32", "speedup_vs_fastest_fp32"),
            ("INT8 ops", "int8_ops"),
            ("FP32 ops", "fp32_ops"),
            ("unfused Q/DQ", "unfused_qdq"),
            ("kept FP32", "fp32_nodes"),
        ],
    )
    write_results(args.out, {"input_size": args.input_size, "threads": args.threads}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
