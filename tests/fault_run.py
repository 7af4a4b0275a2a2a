"""A small real pipeline run in its own process, for the fault tests to interrupt.

    python tests/fault_run.py OUTPUT [--resume] [--slow-stage SECONDS]

Trains nothing beforehand: a tiny conv net with fixed initial weights, synthetic data in
a shuffling DataLoader with its own generator (as the CLI builds it), and sparsity ->
pruning -> distillation -> INT8. ``--slow-stage`` adds a stage after pruning that sleeps,
so a test can interrupt the run between two finished stages. Exit 130 on Ctrl-C.
"""

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import loaders
from user_models import Net

import compressor as cz
from compressor.stage import Stage


@dataclass(frozen=True)
class Sleep(Stage):
    """A torch stage that only waits (and so changes nothing)."""

    seconds: float = 0.0
    name = "sleep"

    def apply(self, state, ctx):
        time.sleep(self.seconds)
        return state


def main() -> int:
    # Ctrl-C as in a terminal, even when the suite itself was started in the background
    # (a shell without job control starts background jobs with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow-stage", type=float, default=0.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Net(num_classes=4).eval()
    train, val = loaders(n_train=128, n_val=64)
    stages = [
        cz.SparsityTraining(epochs=1),
        cz.StructuredPruning(ratio=0.5, round_to=4),
        Sleep(seconds=args.slow_stage),
        cz.Distillation(epochs=1),
        # placement decides by timing; byte-identical artifacts need it off
        cz.Int8Quantization(calibration_samples=32, fp32_placement=False),
    ]
    try:
        cz.Pipeline(stages).run(
            model, train, val, output_dir=args.output, progress=False, threads=1,
            throughput_batch=8, resume=args.resume,
        )  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
