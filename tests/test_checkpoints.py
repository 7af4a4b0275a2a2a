"""Checkpoints stay loadable across versions: they hold tensors and plain values, never
module paths, so moving the package's modules into folders changed nothing they need."""

from pathlib import Path

import torch

from compressor.models.checkpoints import load_checkpoint
from compressor.sources.demo import DemoResNet

DATA = Path(__file__).parent / "data"


def test_a_checkpoint_written_before_the_layout_change_still_loads():
    # written at commit 0fe1fcf (58 flat modules) by compressor.checkpoints.save_checkpoint
    # of DemoResNet(width=16, 1 channel) pruned by StructuredPruning(ratio=0.5), seed 0
    torch.manual_seed(0)
    original = DemoResNet(num_classes=10, width=16, in_channels=1).eval()
    loaded, _ = load_checkpoint(DATA / "pruned_demo_before_layout.pt", original)
    saved = torch.load(DATA / "pruned_demo_before_layout.outputs.pt", weights_only=True)
    with torch.no_grad():
        out = loaded.eval()(saved["x"])
    torch.testing.assert_close(out, saved["y"], rtol=0, atol=1e-6)
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in original.parameters()
    )
