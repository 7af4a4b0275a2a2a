"""A small real pipeline run for the data-parallel tests: run it alone or under torchrun.

    python tests/ranks_run.py OUTPUT RESULTS        # one process
    torchrun --nproc-per-node 2 tests/ranks_run.py OUTPUT RESULTS

A tiny residual net trained briefly (the same weights on every rank), synthetic data in a
shuffling DataLoader, and sparsity -> pruning -> distillation -> INT8. Every rank writes
``RESULTS/rank-N.json``: the fingerprint of the model it returned, its top-1 and the stage
details about the ranks, and the channels sparsity training scheduled.
``--latency-aware`` plans the pruning from the per-layer latency table. ``--fail-rank R --fail-at P`` makes pass P over rank R's training data fail;
``--fail-after-pruning`` adds a stage that fails on rank 0 (which runs it alone).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyResNet, fit, loaders

import compressor as cz
from compressor.data import DataSpec
from compressor.errors import UserError
from compressor.models.checkpoints import model_fingerprint
from compressor.pruning.latency_table import timings
from compressor.runtime.measure import top1
from compressor.stage import RunContext, Stage, State


class Broken:
    """Batches whose pass number ``fail_at`` fails, and every one after it."""

    def __init__(self, loader: object, fail_at: int) -> None:
        self.loader, self.fail_at, self.passes = loader, fail_at, 0

    def __iter__(self):
        self.passes += 1
        if self.passes >= self.fail_at:
            msg = f"rank {os.environ.get('RANK')}: its data failed in pass {self.passes}"
            raise OSError(msg)
        return iter(self.loader)


@dataclass(frozen=True)
class FailOnRankZero(Stage):
    """A stage rank 0 runs alone (it does not train) that fails there."""

    name = "fail_on_rank_zero"

    def apply(self, state: State, ctx: RunContext) -> State:
        msg = "this stage fails on rank 0"
        raise UserError(msg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-after-pruning", action="store_true", help="on rank 0, alone")
    parser.add_argument("--fail-at", type=int, default=3, help="the pass of the data that fails")
    parser.add_argument("--latency-aware", action="store_true", help="latency-aware pruning")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    train, val = loaders(n_train=256, n_val=128, batch_size=16)
    model = fit(TinyResNet(), train, epochs=2)
    if args.fail_rank == rank:
        train = Broken(train, args.fail_at)
    pipeline = cz.Pipeline(
        [
            cz.SparsityTraining(epochs=1),
            cz.StructuredPruning(ratio=0.5, latency_aware=args.latency_aware),
            *([FailOnRankZero()] if args.fail_after_pruning else []),
            cz.Distillation(epochs=2),
            cz.Int8Quantization(calibration_samples=64, fp32_placement=False),
        ]
    )
    result = pipeline.run(
        model,
        train,
        val,
        output_dir=args.output,
        threads=1,
        progress=False,
        device="cpu",
        runtimes=["onnxruntime"],
    )
    ranks = {row.name: row.details.get("data_parallel") for row in result.report.rows}
    sparsity = result.report.row("sparsity_training").details["sparsity"]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "fingerprint": model_fingerprint(result.model),
                "top1": top1(lambda x: result.model(x), DataSpec(val)),
                "int8_top1": result.report.row("int8_quantization").accuracy,
                "ranks": ranks,
                "scheduled": sparsity.get("scheduled_channels"),
                "timings": sorted((repr(k), v) for k, v in timings().items()),
                "allocation": result.report.row("structured_pruning").details["pruning"][
                    "allocation"
                ],
                "output_dir": str(result.output_dir),
            }
        )
    )


if __name__ == "__main__":
    main()
