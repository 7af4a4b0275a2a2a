"""Every torchvision classification model through pruning, export and INT8 (issue: the zoo).

For each model (random weights): StructuredPruning(ratio=0.3) -> ONNX export with the parity
check -> Int8Quantization (calibrated on random inputs) -> an ONNX Runtime run that must give
the right output shape; then FP32 ONNX of the unpruned model vs the INT8 file at batch 1,
measured side by side with compressor's own benchmark code.

    python benchmarks/zoo.py                      # the whole zoo, 224x224, all cores
    python benchmarks/zoo.py resnet18 vit_b_16    # some models
    python benchmarks/zoo.py --input-size 64 --no-latency   # quicker: pass/fail only

Each model runs in its own process (a crash or a timeout fails that model only). Prints a
table and writes benchmarks/results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def fixed_size(name: str) -> int | None:
    """Models that only run (or export) at one input size."""
    # alexnet and vgg pool adaptively to 6x6 / 7x7, which ONNX export supports only when
    # that divides the feature map: at 224 it does.
    if name.startswith(("vit_", "maxvit", "alexnet", "vgg")):
        return 224
    if name.startswith("inception"):
        return 299
    return None


def build(name: str) -> Any:
    """torchvision's model ``name`` with random weights (no auxiliary heads), in eval mode."""
    import torchvision

    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, **kwargs).eval()


def check_model(model: Any, name: str, size: int, threads: int, latency: bool) -> dict[str, Any]:
    """Prune (0.3), export with parity, quantize to INT8 and run it; the row of the table."""
    import copy

    import torch
    from common import compressor_int8

    import compressor as cz
    from compressor.bench import bench
    from compressor.data import DataSpec
    from compressor.errors import first_line
    from compressor.export import export_onnx
    from compressor.measure import count_params_macs, ort_predictor, ort_session
    from compressor.pruning import prune

    row: dict[str, Any] = {"model": name, "input_size": size, "status": "fail"}
    seconds: dict[str, float] = {}
    torch.manual_seed(0)
    example = torch.randn(1, 3, size, size)
    calib = torch.randn(16, 3, size, size)
    data = DataSpec([(calib[i : i + 8], torch.zeros(8, dtype=torch.long)) for i in (0, 8)])
    with torch.no_grad():
        classes = model(example).shape[-1]
    row["params_before"], row["macs_before"] = count_params_macs(model, example)
    step = "pruning"
    try:
        with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
            out = Path(tmp)
            t0 = time.perf_counter()
            options = cz.StructuredPruning(ratio=0.3)
            student, details = prune(copy.deepcopy(model), example, options)
            seconds["prune"] = time.perf_counter() - t0
            row["left_whole"] = details["pruning"]["left_whole"]
            if "pruned_blocks" in details["pruning"]:  # pruned around untraceable blocks
                row["pruned_blocks"] = len(details["pruning"]["pruned_blocks"])
            row["params_after"], row["macs_after"] = count_params_macs(student, example)
            step = "export"
            t0 = time.perf_counter()
            export_onnx(model, example, out / "model.onnx", check_inputs=calib[:2], threads=threads)
            seconds["export"] = time.perf_counter() - t0
            step = "int8"
            t0 = time.perf_counter()
            int8, details = compressor_int8(student, example, data, out, threads)
            seconds["int8"] = time.perf_counter() - t0
            quant = details["quantization"]
            row["parity_fp32"] = details["parity_fp32"]
            row.update(
                int8_ops=quant["int8_compute_ops"],
                fp32_ops=len(quant["float_compute_ops"]),
                unfused_qdq=quant["unfused_qdq"],
                pre_process=quant["pre_process"],
            )
            step = "onnxruntime run"
            output = ort_predictor(ort_session(int8, threads))(example)
            if tuple(output.shape) != (1, classes):
                msg = f"INT8 output shape {tuple(output.shape)}, expected (1, {classes})"
                raise RuntimeError(msg)
            if latency:
                step = "latency"
                files = [out / "model.onnx", int8]
                fp32, int8 = (r.latency_ms["p50"] for r in bench(files, batch_sizes=[1]).rows)
                row.update(fp32_ms=fp32, int8_ms=int8, speedup=round(fp32 / int8, 3))
        row["status"] = "pass"
    except Exception as exc:  # the table records every failure with its step
        row["reason"] = f"{step}: {type(exc).__name__}: {first_line(exc)[:300]}"
    row["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return row


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size = fixed_size(args.one) or args.input_size
        row = check_model(build(args.one), args.one, size, args.threads, not args.no_latency)
        print("ZOO-ROW " + json.dumps(row))
        return 0
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--input-size", str(args.input_size)]
        command += ["--threads", str(args.threads)] + (["--no-latency"] * args.no_latency)
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            found = [ln for ln in done.stdout.splitlines() if ln.startswith("ZOO-ROW ")]
            if found:
                row = json.loads(found[-1].removeprefix("ZOO-ROW "))
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": name, "status": "fail", "reason": f"crashed: {tail[:300]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "fail", "reason": f"timeout after {args.timeout} s"}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(_line(row), flush=True)
        _write(args, rows)  # after every model: a long run stopped early keeps what it did
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed}/{len(rows)} models yield a valid INT8 artifact")
    return 0 if passed == len(rows) else 1


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    passed = sum(r["status"] == "pass" for r in rows)
    summary = {"input_size": args.input_size, "threads": args.threads, "passed": passed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**summary, "total": len(rows), "rows": rows}, indent=2) + "\n")
    tmp.replace(args.out)


def _m(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}M"


def _line(r: dict[str, Any]) -> str:
    speed = (
        f"{r['fp32_ms']:.1f}->{r['int8_ms']:.1f} ms ({r['speedup']:.2f}x)"
        if "speedup" in r
        else "-"
    )
    parity = r.get("parity_fp32", {}).get("max_abs_diff")
    return (
        f"| {r['model']} | {_m(r.get('params_before'))} -> {_m(r.get('params_after'))} | "
        f"{_m(r.get('macs_before'))} -> {_m(r.get('macs_after'))} | "
        f"{'-' if parity is None else f'{parity:.2g}'} | {speed} | {r['status']} | "
        f"{r.get('reason', '') or _note(r)} | {r.get('wall_s', '')} |"
    )


def _note(r: dict[str, Any]) -> str:
    if "pruned_blocks" not in r:
        return ""
    return f"pruned only inside {r['pruned_blocks']} blocks (MLPs, branches)"


if __name__ == "__main__":
    sys.exit(main())
