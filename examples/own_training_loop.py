"""Compress inside your own training loop: the pipeline's pieces, driven by your script.

The script keeps its own recipe throughout (AdamW with a OneCycle schedule, bf16 autocast,
random-crop and flip augmentation, gradient clipping) and calls compressor where it needs it:

1. ``cz.plan_pruning``: which channels pruning will remove, and the MACs it keeps;
2. ``cz.SparsityRegularizer``: its ``penalty()`` in the loss and ``step()`` after each
   optimizer step drive exactly those channels to zero while the model trains;
3. ``cz.prune``: a pruned copy (the channels are already zero, so accuracy barely moves);
4. ``cz.DistillationLoss``: the same loop fine-tunes the pruned model against the original;
5. ``cz.quantize`` and ``cz.compare``: the INT8 ONNX file, and the report of all three.

    python examples/own_training_loop.py                # embedded demo data, ~3 min on 2 cores
    python examples/own_training_loop.py --quick        # a smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from train_then_compress import build_model  # the same small CNN (examples/ is on the path)

import compressor as cz
from compressor.sources.demo import demo_data


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and 2-pixel shifts (padding, then a random crop)."""
    flip = torch.rand(x.shape[0], 1, 1, 1) < 0.5
    x = torch.where(flip, x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    i, j = torch.randint(0, 5, (2,)).tolist()
    return padded[:, :, i : i + x.shape[2], j : j + x.shape[3]]


def fit(model, loader, epochs, lr, loss_of, after_step=None, limit=None) -> None:
    """The user's own loop: AdamW + OneCycle, bf16 autocast, augmentation, clipping."""
    steps = epochs * min(len(loader), limit or len(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for index, (x, y) in enumerate(loader):
            if limit and index == limit:
                break
            x = augment(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=2.0)
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/own_loop"))
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, val = demo_data(batch_size=64)
    limit = 40 if args.quick else None
    epochs = 1 if args.quick else 4

    # your training, as it always was
    model = build_model()
    fit(model, train, epochs, 3e-3, lambda m, x, y: F.cross_entropy(m(x), y), limit=limit)

    # 1-2: plan the pruning, then train on with the penalty that zeroes those channels
    example = next(iter(val))[0][:1]
    plan = cz.plan_pruning(model, example, ratio=0.5, round_to=8)
    print(plan)
    sparse = copy.deepcopy(model)
    sparse_epochs = 1 if args.quick else 2
    steps = sparse_epochs * min(len(train), limit or len(train))
    reg = cz.SparsityRegularizer(sparse, plan, total_steps=steps)
    fit(
        sparse,
        train,
        sparse_epochs,
        1e-3,
        lambda m, x, y: F.cross_entropy(m(x), y) + reg.penalty(),
        after_step=reg.step,
        limit=limit,
    )

    # 3: prune (the removed channels are exactly zero: the outputs do not change)
    pruned = cz.prune(sparse, example, plan)
    before, after = accuracy(sparse, val), accuracy(pruned, val)
    print(f"accuracy before pruning {before:.4f}, right after {after:.4f}")

    # 4: distil from the original model with the same loop
    kd = cz.DistillationLoss(model, temperature=4.0, alpha=0.7)
    fit(pruned, train, sparse_epochs, 1e-3, lambda m, x, y: kd(m(x), x, y), limit=limit)

    # 5: quantize, and compare the three in the runtimes they run in
    args.output.mkdir(parents=True, exist_ok=True)
    int8 = cz.quantize(pruned, train, args.output / "model.int8.onnx", eval_data=val)
    report = cz.compare(
        {"baseline": model, "sparse": sparse, "pruned": pruned, "int8": int8},
        eval_data=val,
        output_dir=args.output,
    )
    print(report)
    summary = {
        "accuracy_before_pruning": before,
        "accuracy_after_pruning": after,
        "regularizer": reg.report()["method"],
        "plan": plan.summary(),
    }
    (args.output / "own_loop.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
