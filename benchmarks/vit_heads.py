"""Whole attention heads against head-mixing pruning on torchvision's ViT-B/16.

ViT-B/16 (random weights given a signal by `zoo.give_signal`, one per seed), pruned 0.3 with
uniform allocation, no fine-tuning, three ways:

- ``whole``: compressor's default, whole heads removed (12 -> 8 heads of 64);
- ``dims``: every head kept, the same dimensions removed from each;
- ``mixing``: what compressor did before adapters: torch-pruning not told the head count,
  channels removed anywhere in the embedding (round_to 48 keeps it divisible by 12), the
  rest cut into 12 contiguous heads that each span parts of several original heads.

For each: MACs after/before, and the cosine similarity of the logits to the unpruned
model's on held-back images. Mean and spread over seeds. Each model is measured as it is
and with its attention sharpened (`sharpen`): random weights attend almost uniformly.

    python benchmarks/vit_heads.py                # 3 seeds, 224x224
    python benchmarks/vit_heads.py --seeds 0 --model vit_b_32

Prints a table and writes benchmarks/results/vit_heads.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from common import print_table, write_results
from zoo import build, give_signal, signal_data

import compressor as cz
from compressor import adapters
from compressor.measure import count_params_macs
from compressor.pruning import prune

RESULTS = Path(__file__).parent / "results" / "vit_heads.json"
MODES = {
    "whole": {"attention_heads": "whole", "round_to": None},
    "dims": {"attention_heads": "dims", "round_to": None},
    "mixing": {"round_to": 48},
}


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def sharpen(model: torch.nn.Module, factor: float) -> None:
    """Scale every attention layer's query and key weights so logits grow ``factor`` times.

    Random weights attend almost uniformly, so which dimensions form a head hardly
    matters; trained ViTs attend sharply. Scaling q and k by sqrt(factor) gives the random
    model peaked attention patterns without changing anything else.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                e = m.embed_dim
                m.in_proj_weight[: 2 * e] *= factor**0.5
                m.in_proj_bias[: 2 * e] *= factor**0.5


def run(name: str, seed: int, ratio: float, samples: int, factor: float) -> list[dict[str, Any]]:
    model = give_signal(build(name), 224, seed=seed)
    sharpen(model, factor)
    images, _ = signal_data(224, samples, seed=100 + seed)
    example = images[:1]
    logits = outputs(model, images)
    _, macs = count_params_macs(model, example)
    rows = []
    for mode, options in MODES.items():
        stage = cz.StructuredPruning(ratio=ratio, global_pruning=False, **options)
        removed = None
        if mode == "mixing":  # torch-pruning not told where the heads are
            removed = next(a for a in adapters.adapters() if a.name == "multihead_attention")
            adapters.unregister_adapter(removed.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned, _ = prune(copy.deepcopy(model), example, stage)
        finally:
            if removed is not None:
                adapters.register_adapter(removed, first=False)
        got_logits = outputs(pruned, images)
        attention = pruned.encoder.layers[0].self_attention
        rows.append(
            {
                "mode": mode,
                "attention_sharpened": factor,
                "seed": seed,
                "heads": attention.num_heads,
                "head_dim": attention.head_dim,
                "hidden_dim": pruned.hidden_dim,
                "macs_ratio": round(count_params_macs(pruned, example)[1] / macs, 4),
                "cosine_logits": round(cosine(got_logits, logits), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--sharpen", type=float, nargs="+", default=[1.0, 16.0], help="q.k scale factors"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    runs = [
        row
        for factor in args.sharpen
        for seed in args.seeds
        for row in run(args.model, seed, args.ratio, args.samples, factor)
    ]
    table = []
    for factor, mode in [(f, m) for f in args.sharpen for m in MODES]:
        mine = [r for r in runs if r["mode"] == mode and r["attention_sharpened"] == factor]
        keys = ("attention_sharpened", "mode", "heads", "head_dim", "hidden_dim", "macs_ratio")
        entry = {k: mine[0][k] for k in keys}
        for key in ("cosine_logits",):
            values = [r[key] for r in mine]
            entry[key] = round(statistics.mean(values), 4)
            entry[f"{key}_spread"] = round(max(values) - min(values), 4)
        table.append(entry)
    columns = [(k, k) for k in table[0]]
    print_table(table, columns)
    settings = {"model": args.model, "ratio": args.ratio, "seeds": args.seeds}
    write_results(args.out, {**settings, "samples": args.samples}, table + runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
