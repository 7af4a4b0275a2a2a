"""Text classification end to end: a BERT-style encoder on the standard-library task.

The task is `compressor.sources.text_data.stdlib_docs` (the CLI's ``--data text-demo``): docstrings
and comment blocks of 8 Python standard-library packages, labelled by package, about 2,900
training and 710 validation samples, encoded as ``[CLS] words [SEP]`` in 128 tokens
(``input_ids`` and ``attention_mask``).

The model (``hf:bert-tiny`` by default: 2 layers, width 128, 2 heads; random initial weights)
is trained once (cached), then compressed with sparsity training -> pruning (whole heads,
FFN width) -> distillation -> INT8 (``mode: auto``: static and dynamic measured, the faster
kept), three seeds. Every compressor number comes from the pipeline's own report (top-1 over
all validation samples in ONNX Runtime); the peers' INT8 of the same baseline ``model.onnx``
(ONNX Runtime's ``quantize_dynamic`` and ``quantize_static``, each with its defaults) is
measured on the same data, and every file is timed side by side at batch 1, sequence length
128. Prints a table of means and spreads and writes benchmarks/results/text_classification.json
after every run.

    python benchmarks/text_classification.py            # about 25 minutes on 2 cores
    python benchmarks/text_classification.py --seeds 0 --baseline-epochs 1 --train-batches 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TABLE_RUN, files_p50, mean_spread, print_table, write_results

import compressor as cz
from compressor._io import atomic_path, write_text
from compressor.data import DataSpec
from compressor.inputs import feeds, take
from compressor.models.model_io import top1
from compressor.runtime.measure import ort_predictor, ort_session
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.model_specs import load_model
from compressor.training.loop import fit_baseline

HERE = Path(__file__).parent


def baseline(name: str, train: Any, info: Any, epochs: int, cache: Path) -> torch.nn.Module:
    """``hf:name`` trained ``epochs`` on all training samples; cached."""
    torch.manual_seed(0)
    model = load_model(f"hf:{name}", num_classes=info.num_classes, vocab_size=info.vocab_size)
    path = cache / f"text_{name}_v{info.vocab_size}_e{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    fit_baseline(model, train, epochs=epochs, lr=0.05, seed=0)
    print(f"{name}: baseline trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def stages(ratio: float, distill_epochs: int) -> list[cz.Stage]:
    """The short budget: 1 epoch of sparsity training, then distillation."""
    return [
        cz.SparsityTraining(epochs=1),
        cz.StructuredPruning(ratio=ratio),
        cz.Distillation(epochs=distill_epochs),
        cz.Int8Quantization(),
    ]


def run_one(
    model: torch.nn.Module, args: argparse.Namespace, train: Any, val: Any, seed: int, out: Path
) -> dict[str, Any]:
    """One pipeline run; the table's numbers from its report."""
    start = time.perf_counter()
    result = cz.Pipeline(stages(args.ratio, args.distill_epochs)).run(
        model,
        train,
        val,
        output_dir=out,
        seed=seed,
        **TABLE_RUN,
        runtimes=["onnxruntime"],
        limit_train_batches=args.train_batches,
    )
    report = result.report
    rows = {(r.name, r.runtime): r for r in report.rows}
    base = rows[("baseline", "onnxruntime")]
    final = report.rows[-1]
    quantization = final.details["quantization"]
    pruning = rows[("structured_pruning", "torch")].details["pruning"]
    return {
        "baseline_acc": base.accuracy,
        "sparsity_acc": rows[("sparsity_training", "torch")].accuracy,
        "pruned_acc": rows[("structured_pruning", "torch")].accuracy,
        "distilled_acc": rows[("distillation", "torch")].accuracy,
        "final_acc": final.accuracy,
        "drop_points": round(100 * (base.accuracy - final.accuracy), 2),
        "macs_x": round(base.macs / final.macs, 2),
        "size_x": report.summary.get("size_ratio"),
        "heads": pruning.get("attention_heads"),
        "int8_format": quantization["format"],
        "mode_choice": quantization["mode_choice"],
        "agreement": (report.parity or {}).get("top1_agreement"),
        "seconds": round(time.perf_counter() - start, 1),
    }


class _Reader:
    """ONNX Runtime calibration reader over named inputs (the data's first batches)."""

    def __init__(self, data: DataSpec, names: list[str]) -> None:
        self.batches = iter([feeds(data.input_fn(b), names) for b in data])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def peers(out: Path, calibration: DataSpec, val: DataSpec) -> dict[str, dict[str, Any]]:
    """Top-1 of the peers' INT8 files made from the same baseline ``model.onnx``."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    fp32 = out / "model.onnx"
    names = [i.name for i in ort_session(fp32, 1).get_inputs()]
    files = {"ort_dynamic": out / "peer_dynamic.onnx", "ort_static": out / "peer_static.onnx"}
    quantize_dynamic(str(fp32), str(files["ort_dynamic"]))
    quantize_static(str(fp32), str(files["ort_static"]), _Reader(calibration, names))
    return {
        name: {"file": path, "acc": top1(ort_predictor(ort_session(path, 2)), val)}
        for name, path in files.items()
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per artifact: the FP32 baseline, compressor's pipeline and each peer's INT8."""
    base = runs[0]["baseline_acc"]
    rows = [
        {
            "artifact": "FP32 baseline (model.onnx)",
            "seeds": len(runs),
            "acc": round(base, 4),
            "drop_points": "0.00",
            "macs_x": "1.00",
            "p50_ms": mean_spread([r["p50_ms"]["fp32"] for r in runs]),
            "speedup_bs1": "1.00",
        },
        {
            "artifact": "compressor: pruned + INT8",
            "seeds": len(runs),
            "acc": round(statistics.fmean(r["final_acc"] for r in runs), 4),
            "drop_points": mean_spread([r["drop_points"] for r in runs]),
            "macs_x": mean_spread([r["macs_x"] for r in runs]),
            "p50_ms": mean_spread([r["p50_ms"]["compressor"] for r in runs]),
            "speedup_bs1": mean_spread(
                [r["p50_ms"]["fp32"] / r["p50_ms"]["compressor"] for r in runs]
            ),
        },
    ]
    for peer in runs[0]["peers"]:
        rows.append(
            {
                "artifact": f"{peer} INT8 of the baseline",
                "seeds": len(runs),
                "acc": round(statistics.fmean(r["peers"][peer]["acc"] for r in runs), 4),
                "drop_points": mean_spread(
                    [100 * (r["baseline_acc"] - r["peers"][peer]["acc"]) for r in runs]
                ),
                "macs_x": "1.00",
                "p50_ms": mean_spread([r["p50_ms"][peer] for r in runs]),
                "speedup_bs1": mean_spread([r["p50_ms"]["fp32"] / r["p50_ms"][peer] for r in runs]),
            }
        )
    return rows


def save(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    settings = {
        "model": f"hf:{args.model}",
        "seq_len": args.seq_len,
        "ratio": args.ratio,
        "baseline_epochs": args.baseline_epochs,
        "distill_epochs": args.distill_epochs,
        "train_batches": args.train_batches,
        "python": sys.version.split()[0],
        "threads": 2,
    }
    write_results(args.out, settings, aggregate(runs))
    data = json.loads(args.out.read_text())
    data["runs"] = runs
    write_text(args.out, json.dumps(data, indent=2, default=str) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-tiny", help="an hf: preset or config")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument(
        "--train-batches", type=int, default=None, help="batches (of 32) per stage epoch"
    )
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "text_classification.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    train, val, info = load_data("text-demo", DataOptions(seq_len=args.seq_len))
    model = baseline(args.model, train, info, args.baseline_epochs, args.cache)
    val_spec = DataSpec(val)
    calibration = DataSpec([b for b, _ in zip(train, range(8), strict=False)])  # 256 samples
    example = take(next(iter(val))[0], 0, 1)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        out = args.cache / "text" / f"{args.model}_{seed}"
        found = run_one(model, args, train, val, seed, out)
        others = peers(out, calibration, val_spec)
        files = {"fp32": out / "model.onnx", "compressor": out / "model.int8.onnx"}
        files.update({peer: v["file"] for peer, v in others.items()})
        found["p50_ms"] = files_p50(files, example)
        found["peers"] = {peer: {"acc": v["acc"]} for peer, v in others.items()}
        runs.append({"seed": seed, **found})
        print(json.dumps(runs[-1], default=str), file=sys.stderr, flush=True)
        save(args, runs)
    print_table(
        aggregate(runs),
        [
            ("artifact", "artifact"),
            ("seeds", "seeds"),
            ("top-1 (mean)", "acc"),
            ("drop, points", "drop_points"),
            ("MACs x", "macs_x"),
            ("p50 ms, bs 1", "p50_ms"),
            ("speedup vs ORT FP32", "speedup_bs1"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
