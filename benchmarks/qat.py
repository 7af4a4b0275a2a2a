"""Quantization-aware training against post-training INT8, with and without FP32 fallback.

Two Fashion-MNIST models, three seeds each:

- ``outlier``: `int8_budget.py`'s plain network (four 3x3 convs with ReLU, no BatchNorm),
  trained for one epoch with Adam on the 60,000 training images per seed, with its busiest
  first-layer channel scaled up to 100x the activation's peak and the next conv's weights on
  it down (the same function in FP32; 8 bits for that activation leave the other channels a
  hundredth of their resolution): a model PTQ loses many points on.
- ``dwse``: `compose.py`'s depthwise inverted-residual network with squeeze-excitation and
  BatchNorm (MobileNetV3-style, trained for 4 epochs with Adam; cached), where PTQ is close.

Each model goes through ``Pipeline([Int8Quantization(...)])`` four ways: ``ptq`` (calibrated
INT8, ``qat: never``), ``ptq_fp32`` (the same with the pipeline's accuracy budget
``--budget``: nodes reverted to FP32 until it is met), ``qat`` (``qat: always``, one epoch
over the training images) and ``auto`` (the defaults with the budget: QAT when PTQ misses
it, then FP32 fallback if QAT misses it too). Accuracy over the 10,000 test images, each
file run in ONNX Runtime and in OpenVINO (from the pipeline's report); batch-1 p50 latency
of every file side by side in each runtime, 2 threads.

    python benchmarks/qat.py                      # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import TABLE_RUN, files_p50, print_table, write_results
from compose import baseline, tensors
from fashion_mnist import prepare_debian
from int8_budget import PlainNet, train_adam

import compressor as cz

HERE = Path(__file__).parent
VARIANTS = ("ptq", "ptq_fp32", "qat", "auto")


def build(name: str, seed: int, train_set: Any, cache: Path, outlier: float) -> torch.nn.Module:
    """The model ``name`` for ``seed`` (see the module docstring)."""
    if name == "dwse":
        return baseline("dwse", train_set, 4, cache)
    torch.manual_seed(seed)
    model = PlainNet()
    train_adam(model, DataLoader(train_set, batch_size=128, shuffle=True), 1, 3e-3)
    model.add_outlier(outlier, next(iter(DataLoader(train_set, batch_size=128)))[0])
    return model


def stage_for(variant: str, epochs: int) -> tuple[cz.Int8Quantization, bool]:
    """The INT8 stage of ``variant`` and whether the run has the accuracy budget."""
    qat = {"ptq": "never", "ptq_fp32": "never", "qat": "always", "auto": "auto"}[variant]
    stage = cz.Int8Quantization(fp32_placement=False, qat=qat, qat_epochs=epochs)
    return stage, variant in ("ptq_fp32", "auto")


def run_model(name: str, seed: int, model: Any, train: Any, test: Any, args: Any) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as tmp:
        files: dict[str, Path] = {}
        for variant in VARIANTS:
            stage, budgeted = stage_for(variant, args.qat_epochs)
            out = Path(tmp) / variant
            start = time.perf_counter()
            result = cz.Pipeline([stage], max_accuracy_drop=args.budget if budgeted else None).run(
                model, train, test, output_dir=out, seed=seed,
                runtimes=["onnxruntime", "openvino"], **TABLE_RUN,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            files.setdefault("fp32", Path(tmp) / "model.onnx")
            if variant == VARIANTS[0]:
                shutil.copyfile(out / "model.onnx", files["fp32"])
            files[variant] = Path(tmp) / f"{variant}.int8.onnx"
            shipped = out / "model.int8.onnx"
            if not shipped.is_file():  # the budget was missed
                shipped = out / "model.int8.over-budget.onnx"
            shutil.copyfile(shipped, files[variant])
            base = result.report.rows[0].accuracy
            ort = result.report.row("int8_quantization", "onnxruntime")
            vino = result.report.row("int8_quantization", "openvino")
            q = ort.details["quantization"]
            qat = q.get("qat") or {}
            budget = q.get("accuracy_budget") or {}
            rows.append({
                "model": name, "seed": seed, "variant": variant,
                "baseline": base,
                "ptq": qat.get("ptq_accuracy"),
                "accuracy": ort.accuracy,
                "drop_points": round((base - ort.accuracy) * 100, 2),
                "openvino_accuracy": vino.accuracy,
                "openvino_from": vino.details.get("accuracy_from"),
                "qat_kept": qat.get("kept"),
                "qat_torch_accuracy": qat.get("torch_accuracy"),
                "qat_seconds": qat.get("seconds"),
                "fp32_nodes": len(budget.get("fp32_nodes", [])),
                "float_compute_ops": len(q.get("float_compute_ops", [])),
                "budget_met": result.budget_met,
                "stage_seconds": round(seconds, 1),
            })  # fmt: skip
            print_table(rows[-1:], COLUMNS)
        example = next(iter(test))[0][:1]
        for runtime in ("onnxruntime", "openvino"):
            p50 = files_p50(files, example, threads=2, runtime=runtime)
            for row in rows:
                row[f"{runtime}_p50_ms"] = p50[row["variant"]]
                row[f"{runtime}_fp32_p50_ms"] = p50["fp32"]
                row[f"{runtime}_vs_fp32"] = round(p50["fp32"] / p50[row["variant"]], 3)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of each model and variant."""
    found = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for variant in VARIANTS:
            mine = [r for r in rows if r["model"] == name and r["variant"] == variant]
            if not mine:
                continue
            entry: dict[str, Any] = {"model": name, "variant": variant, "seed": "mean"}
            for key in ("baseline", "accuracy", "drop_points", "openvino_accuracy",
                        "fp32_nodes", "onnxruntime_vs_fp32", "openvino_vs_fp32"):  # fmt: skip
                values = [r[key] for r in mine if r.get(key) is not None]
                if values:
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    entry[key] = f"{statistics.fmean(values):.4g} ± {spread:.2g}"
            found.append(entry)
    return found


COLUMNS = [
    ("model", "model"),
    ("seed", "seed"),
    ("variant", "variant"),
    ("baseline", "baseline"),
    ("INT8 acc (ORT)", "accuracy"),
    ("drop, points", "drop_points"),
    ("OpenVINO acc", "openvino_accuracy"),
    ("QAT torch acc", "qat_torch_accuracy"),
    ("kept", "qat_kept"),
    ("FP32 nodes", "fp32_nodes"),
    ("vs FP32, ORT bs 1", "onnxruntime_vs_fp32"),
    ("vs FP32, OpenVINO bs 1", "openvino_vs_fp32"),
    ("s", "stage_seconds"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / ".cache" / "data")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--models", nargs="+", choices=("outlier", "dwse"),
                        default=["outlier", "dwse"])  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--outlier", type=float, default=100.0)
    parser.add_argument(
        "--train-images", type=int, default=None, help="for training and QAT (default: all)"
    )
    parser.add_argument("--test-images", type=int, default=None, help="default: all")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "qat.json")
    args = parser.parse_args()
    prepare_debian(args.data)
    train_set, test_set = tensors(args.data)
    if args.train_images:
        train_set = torch.utils.data.Subset(train_set, range(args.train_images))
    if args.test_images:
        test_set = torch.utils.data.Subset(test_set, range(args.test_images))
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for seed in args.seeds:
            model = build(name, seed, train_set, args.cache, args.outlier)
            train = DataLoader(train_set, batch_size=128, shuffle=True,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip
            test = DataLoader(test_set, batch_size=256)
            rows += run_model(name, seed, model, train, test, args)
    print()
    print_table(rows, COLUMNS)
    print()
    print_table(summary(rows), COLUMNS)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
