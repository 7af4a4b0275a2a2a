"""Whole attention heads against head-mixing pruning on torchvision's ViTs.

A torchvision ViT pruned 0.3 with uniform allocation, no fine-tuning, four ways:

- ``whole``: compressor's default: the attention restructured (`SelfAttention`), so whole
  heads are removed by their own scores and the residual channels by theirs;
- ``dims``: the same restructuring, every head kept, the same dimensions removed from each;
- ``whole_tied``: whole heads without the restructuring (issue 14's first version): in
  ``nn.MultiheadAttention`` a head is a block of residual channels, removed with them;
- ``mixing``: what compressor did before adapters: torch-pruning not told the head count,
  channels removed anywhere in the embedding (round_to = the head count keeps it
  divisible), the rest cut into contiguous heads that each span parts of several heads.

Two kinds of model, one per seed:

- default: ViT-B/16 at 224x224, random weights given a signal by `zoo.give_signal`, measured
  as it is and with its attention sharpened (`sharpen`: random weights attend almost
  uniformly); the cosine similarity of the logits to the unpruned model's;
- ``--data ROOT``: a small ViT (4 layers, 8 heads of 16, 28x28 patches of 7) trained on
  Fashion-MNIST for ``--epochs``: the cosine on 1,000 test images and the top-1 accuracy on
  all 10,000, before and after pruning.

Mean and spread (max - min) over seeds.

    python benchmarks/vit_heads.py                # ViT-B/16, 3 seeds
    python benchmarks/vit_heads.py --data /tmp/fmnist
    python benchmarks/vit_heads.py --seeds 0 --model vit_b_32

Prints a table and writes benchmarks/results/vit_heads.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import print_table, write_results
from zoo import build, give_signal, signal_data

import compressor as cz
from compressor import adapters
from compressor._io import atomic_path
from compressor.pruning.engine import prune
from compressor.runtime.measure import count_params_macs

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "vit_heads.json"
MODES = {  # stage options; round_to None: the heads are whole or trimmed alike
    "whole": {"attention_heads": "whole", "round_to": None},
    "dims": {"attention_heads": "dims", "round_to": None},
    "whole_tied": {"attention_heads": "whole", "round_to": None},
    "mixing": {},  # round_to: the head count
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


@contextlib.contextmanager
def mha_adapter(mode: str) -> Iterator[None]:
    """The ``multihead_attention`` adapter as ``mode`` needs it (put back afterwards)."""
    original = next(a for a in adapters.adapters() if a.name == "multihead_attention")
    replacement = {
        "mixing": None,  # torch-pruning not told where the heads are
        "whole_tied": dataclasses.replace(original, restructure=None),
    }.get(mode, original)
    if replacement is original:
        yield
        return
    adapters.unregister_adapter(original.name)
    if replacement is not None:
        adapters.register_adapter(replacement, first=False)
    try:
        yield
    finally:
        adapters.unregister_adapter(original.name)
        adapters.register_adapter(original, first=False)


def prune_modes(
    model: torch.nn.Module, example: torch.Tensor, ratio: float
) -> Iterator[tuple[str, torch.nn.Module, float]]:
    """Each mode's pruned copy of ``model`` and its MACs after/before."""
    heads = model.encoder.layers[0].self_attention.num_heads
    _, macs = count_params_macs(model, example)
    for mode, options in MODES.items():
        options = {"round_to": heads, **options}
        stage = cz.StructuredPruning(ratio=ratio, global_pruning=False, **options)
        with mha_adapter(mode), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, _ = prune(copy.deepcopy(model), example, stage)
        yield mode, pruned.eval(), round(count_params_macs(pruned, example)[1] / macs, 4)


def shape(pruned: torch.nn.Module) -> dict[str, int]:
    attention = pruned.encoder.layers[0].self_attention
    head_dim = getattr(attention, "head_dim", None) or attention.embed_dim // attention.num_heads
    return {"heads": attention.num_heads, "head_dim": head_dim, "hidden_dim": pruned.hidden_dim}


def measure_modes(
    model: torch.nn.Module, images: torch.Tensor, ratio: float, more: Any = None, **fixed: Any
) -> list[dict[str, Any]]:
    """A row per mode: the pruned shape, MACs and logits' cosine (``more(pruned)`` adds)."""
    logits = outputs(model, images)
    rows = []
    for mode, pruned, macs_ratio in prune_modes(model, images[:1], ratio):
        row = {"mode": mode, **fixed, **shape(pruned), "macs_ratio": macs_ratio}
        row["cosine_logits"] = round(cosine(outputs(pruned, images), logits), 4)
        rows.append({**row, **(more(pruned) if more else {})})
        print(rows[-1], flush=True)
    return rows


def run(name: str, seed: int, ratio: float, samples: int, factor: float) -> list[dict[str, Any]]:
    model = give_signal(build(name), 224, seed=seed)
    sharpen(model, factor)
    images, _ = signal_data(224, samples, seed=100 + seed)
    return measure_modes(model, images, ratio, attention_sharpened=factor, seed=seed)


def small_vit() -> torch.nn.Module:
    """A torchvision ViT for 28x28 grey images: 4 layers, 8 heads of 16, patches of 7."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=28, patch_size=7, num_layers=4, num_heads=8, hidden_dim=128, mlp_dim=256
    )
    model.conv_proj = torch.nn.Conv2d(1, 128, 7, 7)
    model.heads = torch.nn.Sequential(torch.nn.Linear(128, 10))
    return model


def trained_vit(root: Path, seed: int, epochs: int) -> tuple[torch.nn.Module, Any]:
    """`small_vit` trained on Fashion-MNIST with ``seed`` (cached), and the test set."""
    from compose import tensors
    from fashion_mnist import prepare_debian
    from torch.utils.data import DataLoader

    from compressor.training.loop import fit_baseline

    prepare_debian(root)
    train, test = tensors(root)
    torch.manual_seed(seed)
    model = small_vit()
    path = HERE / ".cache" / f"vit_heads_small_e{epochs}_s{seed}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        loader = DataLoader(train, batch_size=128, shuffle=True)
        fit_baseline(model, loader, epochs=epochs, lr=0.01, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return model.eval(), test


def accuracy(model: torch.nn.Module, test: Any) -> float:
    images, labels = test.tensors
    with torch.no_grad():
        hits = sum(
            int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    return round(hits / len(labels), 4)


def run_trained(root: Path, seed: int, ratio: float, epochs: int) -> list[dict[str, Any]]:
    model, test = trained_vit(root, seed, epochs)
    before = accuracy(model, test)
    return measure_modes(
        model,
        test.tensors[0][:1000],
        ratio,
        lambda pruned: {"top1_before": before, "top1": accuracy(pruned, test)},
        seed=seed,
    )


def summarise(runs: list[dict[str, Any]], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean and spread of the measured columns for every combination of ``by``."""
    measured = [k for k in ("cosine_logits", "top1_before", "top1") if k in runs[0]]
    fixed = ("heads", "head_dim", "hidden_dim", "macs_ratio")
    table = []
    for key in dict.fromkeys(tuple(r[k] for k in by) for r in runs):
        mine = [r for r in runs if tuple(r[k] for k in by) == key]
        entry = {**dict(zip(by, key, strict=True)), **{k: mine[0][k] for k in fixed}}
        for name in measured:
            values = [r[name] for r in mine]
            entry[name] = round(statistics.mean(values), 4)
            entry[f"{name}_spread"] = round(max(values) - min(values), 4)
        table.append(entry)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--sharpen", type=float, nargs="+", default=[1.0, 16.0], help="q.k scale factors"
    )
    parser.add_argument("--data", type=Path, help="Fashion-MNIST root: the trained small ViT")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs with --data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    if args.data:
        runs = [r for s in args.seeds for r in run_trained(args.data, s, args.ratio, args.epochs)]
        table = summarise(runs, ("mode",))
        settings = {"model": "small_vit (Fashion-MNIST)", "epochs": args.epochs}
        out = args.out or RESULTS.with_name("vit_heads_trained.json")
    else:
        runs = [
            row
            for factor in args.sharpen
            for seed in args.seeds
            for row in run(args.model, seed, args.ratio, args.samples, factor)
        ]
        table = summarise(runs, ("attention_sharpened", "mode"))
        settings = {"model": args.model, "samples": args.samples}
        out = args.out or RESULTS
    print_table(table, [(k, k) for k in table[0]])
    write_results(out, {**settings, "ratio": args.ratio, "seeds": args.seeds}, table + runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
