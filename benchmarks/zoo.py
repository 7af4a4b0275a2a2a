"""Every torchvision classification model through pruning, export and INT8 (issue: the zoo).

For each model: weights that give distinct outputs (random init, zero-initialised output
heads re-initialised, then a few steps fitting a simple rule on random images, `give_signal`)
-> the unpruned FP32 export with its parity -> StructuredPruning(ratio=0.3) -> the pruned
model's FP32 export -> Int8Quantization (calibrated on the fitted images) -> the INT8 file
compared with the pruned FP32 export on held-back images (top-1 agreement and cosine
similarity of the outputs, `int8_agreement`); then, with latency, FP32 ONNX of the unpruned
model vs the INT8 file at batch 1, measured side by side with compressor's own benchmark code.
An exception at any step fails the model, with the step named.

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


def build(name: str, seed: int = 0) -> Any:
    """torchvision's model ``name`` with seeded random weights (no auxiliary heads), in eval mode.

    Seeded, so that a row of the table, and a test's outcome, is the same on every run.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)

    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, **kwargs).eval()


def give_signal(model: Any, size: int, steps: int = 8, seed: int = 0) -> Any:
    """Weights whose outputs differ between inputs: ``model`` fitted briefly, in place.

    Random init leaves some models degenerate (torchvision's ViTs zero-initialise their
    head, so every output is 0 and any comparison passes). Zero-initialised Linear heads are
    re-initialised, then a few Adam steps fit a simple rule on random images (`signal_data`:
    each class a fixed random pattern, plus noise), giving the outputs margins that an INT8
    comparison can test. Returns ``model`` in eval mode.
    """
    import torch
    from torch import nn

    from compressor.data import DataSpec
    from compressor.training.loop import recalibrate_batchnorm

    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not bool(m.weight.detach().abs().sum()):
            nn.init.normal_(m.weight, std=0.02)
    from compressor.runtime.measure import count_params_macs

    _, macs = count_params_macs(model, torch.zeros(1, 3, size, size))
    images, labels = signal_data(size, 32 if macs < 2e9 else 8, seed)  # big models: fewer
    classes = None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        out = model(images)
        out = out.logits if hasattr(out, "logits") else out
        classes = classes or out.shape[-1]
        loss = nn.functional.cross_entropy(out, labels % classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # BatchNorm statistics of the fitted weights (a few steps leave the running ones stale)
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, len(images), 8)]
    recalibrate_batchnorm(model, DataSpec(batches), len(batches))
    model.zero_grad(set_to_none=True)  # as large as the weights; nothing after reads them
    return model.eval()


def signal_data(size: int, samples: int, seed: int) -> tuple[Any, Any]:
    """Images of 10 classes and their labels: a fixed random pattern per class plus noise.

    The patterns are the same for every seed (the class is the same rule); ``seed`` draws
    the labels and the noise.
    """
    import torch

    patterns = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    noise = torch.randn(samples, 3, size, size, generator=generator)
    return patterns[labels] + 0.5 * noise, labels


def int8_agreement(fp32: Path, int8: Path, inputs: Any, threads: int) -> dict[str, float]:
    """Top-1 agreement and mean cosine similarity of the INT8 file's outputs with the FP32 one's."""
    import torch

    from compressor.runtime.measure import ort_predictor, ort_session

    ref = ort_predictor(ort_session(fp32, threads))(inputs).float().flatten(1)
    out = ort_predictor(ort_session(int8, threads))(inputs).float().flatten(1)
    if out.shape != ref.shape:
        msg = f"INT8 output shape {tuple(out.shape)}, FP32 {tuple(ref.shape)}"
        raise RuntimeError(msg)
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=1, eps=1e-12)
    return {
        "top1_agreement": round(float((out.argmax(1) == ref.argmax(1)).float().mean()), 4),
        "cosine": round(float(cosine.mean()), 5),
        "samples": int(ref.shape[0]),
    }


AGREEMENT = {"top1_agreement": 0.9, "cosine": 0.98}  # the bar for INT8 vs FP32


def check_model(
    model: Any,
    name: str,
    size: int,
    threads: int,
    latency: bool,
    fit: bool = True,
    placement: bool = True,
    fit_steps: int = 8,
    in_place: bool = False,
) -> dict[str, Any]:
    """Prune (0.3), export with parity, quantize to INT8, compare with FP32; the table's row.

    ``placement`` False skips the INT8 stage's timing of FP32 fallbacks (every node INT8).
    ``fit_steps``: Adam steps of `give_signal`, recorded in the row. ``in_place``: prune
    ``model`` itself, not a copy (one copy fewer of the largest models' weights).
    """
    import copy

    import torch
    from common import compressor_int8

    import compressor as cz
    from compressor.data import DataSpec
    from compressor.errors import first_line
    from compressor.pruning.engine import prune
    from compressor.report.bench import bench
    from compressor.runtime.export import export_onnx
    from compressor.runtime.measure import count_params_macs

    row: dict[str, Any] = {"model": name, "input_size": size, "status": "fail"}
    seconds: dict[str, float] = {}
    step = "fitting"
    try:
        t0 = time.perf_counter()
        if fit:
            give_signal(model, size, steps=fit_steps)
            row["fit_steps"] = fit_steps
        seconds["fit"] = time.perf_counter() - t0
        images, _ = signal_data(size, 48, seed=1)
        example, calib, held_back = images[:1], images[:16], images[16:]
        data = DataSpec([(calib[i : i + 8], torch.zeros(8, dtype=torch.long)) for i in (0, 8)])
        row["params_before"], row["macs_before"] = count_params_macs(model, example)
        with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
            out = Path(tmp)
            step = "export"
            t0 = time.perf_counter()
            parity = export_onnx(
                model, example, out / "model.onnx", check_inputs=held_back[:8], threads=threads
            )
            row["parity_fp32"] = parity.to_dict()  # the unpruned model's export
            seconds["export"] = time.perf_counter() - t0
            step = "pruning"
            t0 = time.perf_counter()
            options = cz.StructuredPruning(ratio=0.3)
            student, details = prune(model if in_place else copy.deepcopy(model), example, options)
            seconds["prune"] = time.perf_counter() - t0
            row["left_whole"] = details["pruning"]["left_whole"]
            row["notes"] = details.get("notes", [])
            if "pruned_blocks" in details["pruning"]:  # pruned around untraceable blocks
                row["pruned_blocks"] = len(details["pruning"]["pruned_blocks"])
                row["pruned_inside"] = details["pruning"]["pruned_inside"]
            row["params_after"], row["macs_after"] = count_params_macs(student, example)
            step = "pruned export"
            export_onnx(student, example, out / "pruned.onnx", check_inputs=held_back[:8])
            step = "int8"
            t0 = time.perf_counter()
            int8, details = compressor_int8(
                student, example, data, out / "int8", threads, placement=placement
            )
            seconds["int8"] = time.perf_counter() - t0
            quant = details["quantization"]
            row.update(
                int8_ops=quant["int8_compute_ops"],
                fp32_ops=len(quant["float_compute_ops"]),
                unfused_qdq=quant["unfused_qdq"],
                pre_process=quant["pre_process"],
            )
            step = "int8 vs fp32"
            row["int8_vs_fp32"] = int8_agreement(out / "pruned.onnx", int8, held_back, threads)
            if latency:
                step = "latency"
                files = [out / "model.onnx", int8]
                measured = bench(files, batch_sizes=[1], runtimes=["onnxruntime"])
                fp32, int8 = (r.latency_ms["p50"] for r in measured.rows)
                row.update(fp32_ms=fp32, int8_ms=int8, speedup=round(fp32 / int8, 3))
        agreement = row["int8_vs_fp32"]
        short = [k for k, bar in AGREEMENT.items() if agreement[k] < bar]
        row["status"] = "pass"
        if short:
            row["status"] = "int8 disagrees"
            row["reason"] = ", ".join(f"{k} {agreement[k]} < {AGREEMENT[k]}" for k in short)
        elif row["macs_after"] >= row["macs_before"]:
            row["status"] = "not pruned"
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
    parser.add_argument("--fit-steps", type=int, default=8, help="Adam steps of give_signal")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size = fixed_size(args.one) or args.input_size
        model = build(args.one)
        latency = not args.no_latency
        row = check_model(
            model, args.one, size, args.threads, latency, fit_steps=args.fit_steps, in_place=True
        )
        print("ZOO-ROW " + json.dumps(row))
        return 0
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    flags = ["--no-latency"] * args.no_latency + ["--fit-steps", str(args.fit_steps)]
    rows = run_each(__file__, names, args, flags, lambda row: None, _line)
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed}/{len(rows)} models pruned, with an INT8 file that agrees with FP32")
    return 0 if passed == len(rows) else 1


def run_each(
    script: str,
    names: list[str],
    args: argparse.Namespace,
    flags: list[str],
    annotate: Any,
    line: Any,
) -> list[dict[str, Any]]:
    """Run ``script --one NAME`` for every model in its own process; the rows.

    A crash or a timeout fails that model only. ``annotate(row)`` adds to each row,
    ``line(row)`` prints it; the results file is rewritten after every model, so a long
    run stopped early keeps what it did.
    """
    rows = []
    for name in names:
        command = [sys.executable, script, "--one", name, "--input-size", str(args.input_size)]
        command += ["--threads", str(args.threads), *flags]
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
        annotate(row)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(line(row), flush=True)
        _write(args, rows)
    return rows


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
    agree = r.get("int8_vs_fp32", {})
    return (
        f"| {r['model']} | {_m(r.get('params_before'))} -> {_m(r.get('params_after'))} | "
        f"{_m(r.get('macs_before'))} -> {_m(r.get('macs_after'))} | "
        f"{'-' if parity is None else f'{parity:.2g}'} | "
        f"{agree.get('top1_agreement', '-')} | {agree.get('cosine', '-')} | {speed} | "
        f"{r['status']} | "
        f"{r.get('reason', '') or _note(r)} | {r.get('wall_s', '')} |"
    )


def _note(r: dict[str, Any]) -> str:
    if "pruned_blocks" not in r:
        return ""
    heads = sum(v.get("heads_removed", 0) for v in r.get("pruned_inside", {}).values())
    inside = f"; {heads} heads removed inside window attention" if heads else ""
    return f"pruned only inside {r['pruned_blocks']} blocks (MLPs, branches){inside}"


if __name__ == "__main__":
    sys.exit(main())
