"""How cost grows: wall time and peak memory of each stage as the model and the data grow,
and a data-parallel run of 2 processes against 1.

    python benchmarks/scale.py                 # the models and data sizes below, 3 runs each
    python benchmarks/scale.py --ranks         # distillation: 1 process against 2 (torchrun)
    python benchmarks/scale.py resnet18 --samples 64 --runs 1   # one configuration

Each configuration runs in its own process: torchvision's model (random weights, 10
classes) at 64x64, random images in batches of 16, and the four stages one after the
other (``stage.apply``): sparsity training (1 epoch), pruning 0.5, distillation (1 epoch),
INT8 (64 calibration samples). For each stage: wall time, and the peak resident memory
of the process while it ran (sampled every 10 ms), shown above the memory at the start
(torch, the model and the data loaded). Per-sample costs of the training stages
come out of the data-size rows. ``--ranks`` runs the distillation stage of ResNet-18 in one
process with 2 threads and under ``torchrun --nproc-per-node 2`` with 1 thread per rank
(gloo, this machine's loopback).

Prints a table and writes benchmarks/results/scale.json (``--ranks``: scale_ranks.json).
Medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_context, print_table, write_results

MODELS = ["resnet18", "resnet50", "resnet101", "wide_resnet50_2"]  # depth, then width x2
SAMPLES = [64, 128, 256]  # the data-size rows, on resnet18
SIZE, BATCH, CLASSES = 64, 16, 10
STAGES = ["sparsity_training", "structured_pruning", "distillation", "int8_quantization"]
RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The largest resident memory seen while the ``with`` block ran (sampled every 10 ms)."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def context(samples: int, out: Path, threads: int) -> Any:
    """compressor's RunContext over ``samples`` seeded random images."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from compressor.data import DataSpec

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    return cpu_context(DataSpec(loader), out, threads)


def one(model_name: str, samples: int, threads: int) -> dict[str, Any]:
    """The four stages on ``model_name`` with ``samples`` images: seconds and peak memory."""
    import copy
    import dataclasses

    import torch
    import torchvision

    import compressor as cz
    from compressor.runtime.measure import count_params_macs
    from compressor.stage import State

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=CLASSES).eval()
    stages = [
        cz.SparsityTraining(epochs=1),
        cz.StructuredPruning(ratio=0.5),
        cz.Distillation(epochs=1),
        cz.Int8Quantization(calibration_samples=64, fp32_placement=False),
    ]
    row: dict[str, Any] = {"model": model_name, "samples": samples, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        ctx = context(samples, Path(tmp), threads)
        example = ctx.train_data.example_input()
        row["params"], row["macs"] = count_params_macs(model, example)
        state = State(model=model, teacher=copy.deepcopy(model), example_input=example)
        start_rss = rss_bytes()
        for index, stage in enumerate(stages):
            step_ctx = dataclasses.replace(
                ctx, step=stage.name, upcoming=tuple(stages[index + 1 :])
            )
            with PeakMemory() as memory:
                t0 = time.perf_counter()
                state = stage.apply(state, step_ctx)
                seconds = time.perf_counter() - t0
            row[stage.name] = {"seconds": round(seconds, 2), "peak_mb": memory.peak / 2**20}
        row["start_mb"] = start_rss / 2**20
    return row


def one_distillation(samples: int, threads: int) -> dict[str, Any] | None:
    """The distillation stage of ResNet-18 (under torchrun: every rank); rank 0's row."""
    import copy

    import torch
    import torchvision

    import compressor as cz
    from compressor.stage import State
    from compressor.training import distributed

    parallel = distributed.setup()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=CLASSES).eval()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        ctx = context(samples, Path(tmp), threads)
        example = ctx.train_data.example_input()
        state = State(model=model, teacher=copy.deepcopy(model), example_input=example)
        stage = cz.Distillation(epochs=2)
        t0 = time.perf_counter()
        stage.apply(state, ctx)
        seconds = time.perf_counter() - t0
    if distributed.rank() != 0:
        return None
    return {
        "processes": distributed.world_size() if parallel else 1,
        "threads_per_process": threads,
        "samples": samples,
        "epochs": 2,
        "seconds": round(seconds, 2),
        "samples_per_s": round(2 * samples / seconds, 1),
    }


def in_subprocess(args: list[str], torchrun: int = 0) -> dict[str, Any]:
    """This script's ``--one ...`` in a fresh process (or under torchrun); its JSON row."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        script = [str(Path(__file__).resolve()), *args, "--json-out", out.name]
        if torchrun:
            command = [
                sys.executable, "-m", "torch.distributed.run",
                f"--nproc-per-node={torchrun}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=127.0.0.1:29533", *script,
            ]  # fmt: skip
        else:
            command = [sys.executable, *script]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first row with every stage's seconds and peak memory replaced by their medians."""
    row = dict(rows[0])
    for name in STAGES:
        row[name] = {
            key: round(statistics.median(r[name][key] for r in rows), 2)
            for key in ("seconds", "peak_mb")
        }
    row["start_mb"] = round(statistics.median(r["start_mb"] for r in rows), 1)
    row["runs"] = len(rows)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"models (default: {', '.join(MODELS)})")
    parser.add_argument("--samples", type=int, nargs="+", help="training samples per row")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ranks", action="store_true", help="1 process against 2 (torchrun)")
    parser.add_argument("--out", type=Path, help="default: results/scale.json, scale_ranks.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-ranks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one or args.one_ranks:  # a configuration, in the process of its own
        samples = (args.samples or [SAMPLES[-1]])[0]
        if args.one_ranks:
            found = one_distillation(samples, args.threads)
        else:
            found = one(args.one, samples, args.threads)
        if found is not None:
            Path(args.json_out).write_text(json.dumps(found))
        return 0

    settings: dict[str, Any] = {
        "size": SIZE, "batch": BATCH, "classes": CLASSES, "threads": args.threads,
        "runs": args.runs,
    }  # fmt: skip
    if args.ranks:
        samples = str((args.samples or [256])[0])
        one_process = ["--one-ranks", "--samples", samples, "--threads", str(args.threads)]
        two = ["--one-ranks", "--samples", samples, "--threads", str(max(1, args.threads // 2))]
        runs = [(in_subprocess(one_process), in_subprocess(two, 2)) for _ in range(args.runs)]
        rows = []
        for i in (0, 1):
            row = dict(runs[0][i])
            row["seconds"] = statistics.median(r[i]["seconds"] for r in runs)
            row["samples_per_s"] = statistics.median(r[i]["samples_per_s"] for r in runs)
            rows.append(row)
        settings["mode"] = "ranks"
        print_table(
            rows,
            [
                ("processes", "processes"),
                ("threads each", "threads_per_process"),
                ("samples", "samples"),
                ("epochs", "epochs"),
                ("seconds", "seconds"),
                ("samples/s", "samples_per_s"),
            ],
        )
    else:
        configs = [(m, SAMPLES[0]) for m in (args.models or MODELS)]
        if not args.models:  # the data grows, on the smallest model
            configs += [("resnet18", s) for s in SAMPLES[1:]]
        if args.samples:
            configs = [(m, s) for m in (args.models or MODELS) for s in args.samples]
        rows = []
        for name, samples in configs:
            runs = [
                in_subprocess(
                    ["--one", name, "--samples", str(samples), "--threads", str(args.threads)]
                )
                for _ in range(args.runs)
            ]
            rows.append(median_row(runs))
            print(f"{name} x {samples}: done", file=sys.stderr, flush=True)
        settings["mode"] = "stages"
        shown = [
            {
                "model": r["model"],
                "params": r["params"],
                "gmacs": round(r["macs"] / 1e9, 3),
                "samples": r["samples"],
                **{f"{s}_s": r[s]["seconds"] for s in STAGES},
                "start_mb": round(r["start_mb"]),
                **{f"{s}_mb": round(r[s]["peak_mb"] - r["start_mb"]) for s in STAGES},
            }
            for r in rows
        ]
        print_table(
            shown,
            [
                ("model", "model"),
                ("params", "params"),
                ("GMACs", "gmacs"),
                ("samples", "samples"),
                ("sparsity s", "sparsity_training_s"),
                ("pruning s", "structured_pruning_s"),
                ("distillation s", "distillation_s"),
                ("int8 s", "int8_quantization_s"),
                ("MB at start", "start_mb"),
                ("+MB sparsity", "sparsity_training_mb"),
                ("+MB pruning", "structured_pruning_mb"),
                ("+MB distillation", "distillation_mb"),
                ("+MB int8", "int8_quantization_mb"),
            ],
        )
    default = RESULTS / ("scale_ranks.json" if args.ranks else "scale.json")
    write_results(args.out or default, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
