"""Under load: ResNet-18 at 224x224 (random weights), the FP32 baseline file against the
pipeline's artifact (pruned + INT8), under concurrent closed-loop clients.

For each file, `compressor.runtime.load.load_file` runs every setting of
`compressor.runtime.load.default_settings` (one session with every core and one session per core,
each without batching and with the dynamic batcher) at each concurrency level. The whole
measurement is repeated ``--runs`` times; the headline (the artifact's best throughput
within the p99 bound over the baseline's best) is the median of the runs.

Also measured, on the artifact: the batcher's overhead at one client (the p50 of a call
through the batcher without batching against a bare ``session.run`` with the same session
settings, timed by the same loop in five interleaved rounds), and the measured throughput
against the queueing estimate at each level.

    python benchmarks/load.py                       # levels 1 4 16 64, 3 runs
    python benchmarks/load.py --levels 1 2 4 8 16 32 64 --runs 3 --seconds 5

Prints the tables and writes benchmarks/results/load_resnet18.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_data, compressor_int8, print_table, write_results

import compressor as cz
from compressor.pruning.engine import prune
from compressor.runtime.batching import BatchSettings, DynamicBatcher
from compressor.runtime.export import export_onnx
from compressor.runtime.load import default_settings, load_file
from compressor.runtime.measure import default_threads, ort_session, timed_runs


def build(size: int, ratio: float, threads: int, out: Path) -> dict[str, Path]:
    """model.onnx (FP32) and the pruned + INT8 artifact of a random-weight ResNet-18."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    example = torch.randn(1, 3, size, size)
    export_onnx(model, example, out / "model.onnx", threads=threads)
    pruned, _ = prune(model, example, cz.StructuredPruning(ratio=ratio))
    data = calibration_data(size, 64)
    int8, _ = compressor_int8(pruned, example, data, out / "pruned", threads)
    return {"baseline": out / "model.onnx", "final": int8}


def batcher_overhead(path: Path, size: int, threads: int, rounds: int = 5) -> dict[str, Any]:
    """p50 ms at batch 1 of a bare ``session.run`` and of the same call through the batcher
    (no batching, one session), timed by the same loop in interleaved rounds."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    session = ort_session(path, threads)
    setting = BatchSettings(max_batch=1, sessions=1, threads=threads)
    bare, batched = [], []
    with DynamicBatcher(path, setting) as batcher:
        for _ in range(rounds):
            bare.append(timed_runs(lambda: session.run(None, {"input": x})).median * 1000)
            batched.append(timed_runs(lambda: batcher.run({"input": x})).median * 1000)
    return {
        "bare_p50_ms": _median(bare),
        "batcher_p50_ms": _median(batched),
        "overhead_ms": _median([b - a for a, b in zip(bare, batched, strict=True)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    settings = default_settings(args.threads, args.max_batch)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        files = build(args.size, args.ratio, args.threads, Path(tmp))
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            results = {
                role: load_file(
                    path,
                    settings=settings,
                    levels=args.levels,
                    max_requests=args.requests,
                    max_seconds=args.seconds,
                    p99_ms=args.p99_ms,
                )
                for role, path in files.items()
            }
            overhead = batcher_overhead(
                files["final"], args.size, args.threads, args.overhead_rounds
            )
            runs.append({"results": results, **overhead})

    rows = []
    for role in ("baseline", "final"):
        for index, setting in enumerate(settings):
            for li, level in enumerate(args.levels):
                cells = [r["results"][role]["settings"][index]["levels"][li] for r in runs]
                ok = [c for c in cells if "throughput" in c]
                rows.append(
                    {
                        "file": role,
                        "setting": setting.label,
                        "clients": level,
                        "throughput": _median([c["throughput"] for c in ok]),
                        "p50": _median([c["latency_ms"]["p50"] for c in ok]),
                        "p99": _median([c["latency_ms"]["p99"] for c in ok]),
                        "rows_per_run": _median([c["mean_batch"] for c in ok]),
                        "queue_ms": _median([c["queue_ms"] for c in ok]),
                        "run_ms": _median([c["run_ms"] for c in ok]),
                        "estimate": _median([c["estimate"] for c in ok]),
                        "measured_over_estimate": _median(
                            [c["throughput"] / c["estimate"] for c in ok]
                        ),
                    }
                )
    print_table(
        rows,
        [
            ("file", "file"),
            ("setting", "setting"),
            ("clients", "clients"),
            ("req/s", "throughput"),
            ("p50 ms", "p50"),
            ("p99 ms", "p99"),
            ("rows/run", "rows_per_run"),
            ("queue ms", "queue_ms"),
            ("run ms", "run_ms"),
            ("estimate req/s", "estimate"),
            ("measured/estimate", "measured_over_estimate"),
        ],
    )
    bests = []
    for r in runs:
        base, final = (r["results"][k]["best"] for k in ("baseline", "final"))
        bests.append(
            {
                "baseline_best": base,
                "final_best": final,
                "ratio": final["throughput"] / base["throughput"] if base and final else None,
                "bare_p50_ms": r["bare_p50_ms"],
                "batcher_p50_ms": r["batcher_p50_ms"],
                "overhead_ms": r["overhead_ms"],
            }
        )
    summary = {
        "ratio_median": _median([b["ratio"] for b in bests if b["ratio"]]),
        "ratios": [b["ratio"] for b in bests],
        "overhead_ms_median": _median([b.get("overhead_ms") for b in bests]),
        "overheads_ms": [b.get("overhead_ms") for b in bests],
        "runs": bests,
    }
    print(
        f"\nbest within p99 {args.p99_ms:g} ms, artifact over baseline (median of "
        f"{args.runs}): {summary['ratio_median']}x (runs: {summary['ratios']})"
    )
    print(
        f"batcher overhead at 1 client, p50 (median): {summary['overhead_ms_median']} ms "
        f"(runs: {summary['overheads_ms']})"
    )
    write_results(
        args.out / "load_resnet18.json",
        {**vars(args), "out": None, "settings": [s.to_dict() for s in settings]},
        [*rows, {"summary": summary}],
    )


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


if __name__ == "__main__":
    main()
