"""Every Python snippet in README.md and docs/*.md runs, in order, on small real data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from compressor.sources.demo import DemoResNet, demo_datasets
from compressor.training.loop import fit_baseline

ROOT = Path(__file__).parent.parent
# README first: later snippets (docs/faq.md) read the run folder its snippet writes.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def names() -> dict[str, object]:
    """What the snippets take as given: a trained model, loaders, a batch of images."""
    train, val = demo_datasets()
    train_loader = DataLoader(Subset(train, range(512)), batch_size=64, shuffle=True)
    val_loader = DataLoader(Subset(val, range(256)), batch_size=128)
    torch.manual_seed(0)
    model = DemoResNet(width=16)
    fit_baseline(model, train_loader, epochs=1, progress=False)
    images = next(iter(val_loader))[0][:8]
    return {
        "model": model,
        "train_loader": train_loader,
        "val_loader": val_loader,
        "images": images,
    }


def test_the_docs_have_python_snippets():
    with_code = {p.name for p in DOCS if snippets(p)}
    assert {"README.md", "index.md", "concepts.md", "faq.md"} <= with_code


def test_every_python_snippet_runs(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in DOCS:
        namespace = {**names, "__name__": "__snippet__"}
        for index, code in enumerate(snippets(path)):
            where = f"{path.name}, python block {index + 1}"
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{where} failed: {type(exc).__name__}: {exc}")
    assert (tmp_path / "runs" / "r18" / "model.int8.onnx").is_file()
    assert (tmp_path / "runs" / "quick" / "report.json").is_file()
