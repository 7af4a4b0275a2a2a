"""Accuracy on real data: Fashion-MNIST, the FP32 baseline against the pipeline's INT8 file.

Trains a small residual network (compressor.sources.demo.DemoResNet) on the 60,000 training images
(cached after the first run), runs a pipeline preset (default: ``balanced``, the default
pipeline) and measures on the 10,000 test images: top-1, MACs, params, file size, and ONNX
Runtime latency at batch 1 and 32, side by side. For comparison, the same baseline ONNX file
quantized to INT8 without pruning three ways, each calibrated on the same 512 training images:
compressor's Int8Quantization stage alone, ONNX Runtime's quantize_static with its defaults,
and NNCF's nncf.quantize (when nncf is installed).

    apt-get install dataset-fashion-mnist        # Debian: found in /usr/share/datasets
    python benchmarks/fashion_mnist.py
    python benchmarks/fashion_mnist.py --model plain --seeds 0 1 2   # compose.py's PlainNet
    python benchmarks/fashion_mnist.py --data ~/data --download   # elsewhere: torchvision

``--model plain`` (or any model of compose.py) takes compose.py's model, trained with Adam as
a user's script trains it (cached), in place of DemoResNet. ``--seeds`` runs the pipeline once
per seed (the seed orders the training data and seeds the stages); the peers and latencies
are measured on the first seed's files, the accuracy of every seed is reported with the mean
and standard deviation. Prints a table and writes benchmarks/results/fashion_mnist.json.
Target: the final INT8 file within 0.5 points of the baseline's top-1, with >= 3x fewer MACs.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    compressor_int8,
    nncf_int8,
    ort_default_int8,
    print_table,
    side_by_side,
    write_results,
)

import compressor as cz
from compressor._io import atomic_path
from compressor.data import as_data_spec, data_subset
from compressor.runtime.measure import (
    count_params_macs,
    ort_predictor,
    ort_session,
    sample_batch,
    top1,
)
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.demo import DemoResNet
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FILES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def prepare_debian(root: Path) -> None:
    """Un-gzip Debian's dataset-fashion-mnist files where torchvision looks for them."""
    raw = root / "FashionMNIST" / "raw"
    for name in FILES:
        source, target = DEBIAN / f"{name}.gz", raw / name
        if source.is_file() and not target.is_file():
            raw.mkdir(parents=True, exist_ok=True)
            with gzip.open(source) as src, atomic_path(target) as tmp, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def baseline(train: Any, width: int, epochs: int, cache: Path, threads: int) -> torch.nn.Module:
    """DemoResNet trained for ``epochs`` on the training set; cached by width and epochs."""
    torch.manual_seed(0)
    model = DemoResNet(num_classes=10, width=width, in_channels=1)
    path = cache / f"baseline_w{width}_e{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"baseline: loaded {path}", file=sys.stderr)
        return model.eval()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fit_baseline(model, train, epochs=epochs, lr=0.05, seed=0)
    print(f"baseline: trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def user_model(name: str, data: Path, epochs: int) -> torch.nn.Module:
    """compose.py's model ``name``, trained with Adam on the 60,000 images (its cache)."""
    import compose  # imports this module: imported here, not at the top

    return compose.baseline(name, compose.tensors(data)[0], epochs, HERE / ".cache", "adam")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--download", action="store_true", help="let torchvision download")
    parser.add_argument("--recipe", default="balanced", help="preset or YAML recipe")
    parser.add_argument(
        "--model", default="demo", help="demo (DemoResNet) or a compose.py model: plain, resbn"
    )
    parser.add_argument("--width", type=int, default=32, help="DemoResNet width")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=HERE / ".cache" / "fashion_mnist_run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fashion_mnist.json")
    args = parser.parse_args()

    if not args.download:
        prepare_debian(args.data)
    train, val, info = load_data(f"fashion-mnist:{args.data}", DataOptions(download=args.download))
    print(f"data: {info.train_samples} train, {info.val_samples} test images", file=sys.stderr)
    if args.model == "demo":
        model = baseline(train, args.width, args.baseline_epochs, HERE / ".cache", args.threads)
    else:
        model = user_model(args.model, args.data, args.baseline_epochs)

    seeds: list[dict[str, Any]] = []
    for seed in args.seeds:
        output = args.output if seed == args.seeds[0] else args.output / "seeds" / str(seed)
        start = time.perf_counter()
        run = cz.Pipeline.from_recipe(args.recipe).run(
            model, train, val, output_dir=output, threads=args.threads, seed=seed
        )
        seconds = time.perf_counter() - start
        base_row, final_row = run.report.rows[1], run.report.rows[-1]
        drop = round(100 * (base_row.accuracy - final_row.accuracy), 2)
        seeds.append(
            {"seed": seed, "top1": final_row.accuracy, "drop_points": drop, "seconds": seconds}
        )
        print(f"seed {seed}: {final_row.accuracy:.4f} ({drop:+.2f} points)", file=sys.stderr)
        if seed == args.seeds[0]:
            result, pipeline_s = run, seconds
    report = result.report
    base, final = report.rows[1], report.rows[-1]  # baseline ONNX FP32, the final INT8 file

    # INT8 without pruning, three ways, on the same baseline file and calibration images.
    # 512 training images with their labels (the INT8 stage's FP32 placement scores on them)
    calib8 = data_subset(as_data_spec(train, "train"), 512)
    images = sample_batch(calib8, 512)
    peers = args.output / "peers"
    example = images[:1]
    files = {
        "baseline (ort fp32)": args.output / "model.onnx",
        f"{args.recipe} pipeline (ort int8)": result.onnx_path,
        "int8 alone (compressor)": compressor_int8(model, example, calib8, peers, args.threads)[0],
        "int8 alone (ort quantize_static default)": ort_default_int8(
            args.output / "model.onnx", calib8, peers / "ort_default.onnx"
        ),
    }
    nncf_file = nncf_int8(args.output / "model.onnx", calib8, peers / "nncf.onnx")
    if nncf_file is not None:
        files["int8 alone (nncf.quantize)"] = nncf_file

    val_spec = as_data_spec(val, "val")
    params, macs = count_params_macs(model, example)
    rows: list[dict[str, Any]] = []
    predictors = {}
    for variant, path in files.items():
        predict = ort_predictor(ort_session(path, args.threads))
        predictors[variant] = predict
        final_row = variant.endswith("pipeline (ort int8)")
        rows.append(
            {
                "variant": variant,
                "top1": round(top1(predict, val_spec), 4),
                "params": final.params if final_row else params,
                "macs": final.macs if final_row else macs,
                "size_bytes": path.stat().st_size,
            }
        )
    for batch in (1, 32):
        x = sample_batch(val_spec, batch)
        timings = side_by_side({v: (lambda p=p, x=x: p(x)) for v, p in predictors.items()})
        for row in rows:
            row[f"p50_bs{batch}"] = timings[row["variant"]]["p50"]
            row[f"p90_bs{batch}"] = timings[row["variant"]]["p90"]
    for row in rows:
        ref = rows[0]
        row["top1_drop_points"] = round(100 * (ref["top1"] - row["top1"]), 2)
        row["speedup_bs1"] = round(ref["p50_bs1"] / row["p50_bs1"], 2)
        row["speedup_bs32"] = round(ref["p50_bs32"] / row["p50_bs32"], 2)

    print_table(
        rows,
        [
            ("variant", "variant"),
            ("top-1", "top1"),
            ("drop (points)", "top1_drop_points"),
            ("params", "params"),
            ("MACs", "macs"),
            ("file bytes", "size_bytes"),
            ("p50 ms bs1", "p50_bs1"),
            ("x bs1", "speedup_bs1"),
            ("p50 ms bs32", "p50_bs32"),
            ("x bs32", "speedup_bs32"),
        ],
    )
    drops = [s["drop_points"] for s in seeds]
    drop = statistics.mean(drops)
    spread = statistics.stdev(drops) if len(drops) > 1 else 0.0
    fewer = base.macs / final.macs
    met = drop <= 0.5 and fewer >= 3
    print(
        f"\ntarget (within 0.5 points, >= 3x fewer MACs): {'met' if met else 'NOT met'} "
        f"({drop:+.2f} +- {spread:.2f} points over {len(drops)} seed(s), {fewer:.2f}x fewer "
        f"MACs); pipeline {pipeline_s:.0f} s"
    )
    settings = {
        "recipe": args.recipe,
        "model": args.model,
        "seeds": seeds,
        "drop_points_mean": round(drop, 2),
        "drop_points_sd": round(spread, 2),
        "width": args.width,
        "baseline_epochs": args.baseline_epochs,
        "threads": args.threads,
        "pipeline_seconds": round(pipeline_s, 1),
        "target_met": met,
        "stage_seconds": {r.label: r.seconds for r in report.rows},
    }
    write_results(args.out, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
