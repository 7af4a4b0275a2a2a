"""examples/: the scripts run (shortened with --quick) and the recipes load."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import compressor as cz
from compressor.stage import STAGES

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(script: str, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--output", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_train_then_compress(tmp_path):
    report = run_example("train_then_compress.py", tmp_path)
    assert [r["name"] for r in report["rows"]][-1] == "int8_quantization"
    assert (tmp_path / "out" / "model.int8.onnx").is_file()


@pytest.mark.slow
def test_custom_stage_runs_from_a_recipe(tmp_path):
    report = run_example("custom_stage.py", tmp_path)
    own = [r for r in report["rows"] if r["runtime"] != "openvino"]  # also measured there
    names = [r["name"] for r in own]
    assert names == ["baseline", "baseline", "structured_pruning", "fine_tune", "int8_quantization"]
    assert own[3]["details"]["train_loss"]


@pytest.mark.slow
def test_own_training_loop(tmp_path):
    report = run_example("own_training_loop.py", tmp_path)
    assert [(r["name"], r["runtime"]) for r in report["rows"]][-1] == ("int8", "onnxruntime")
    found = json.loads((tmp_path / "out" / "own_loop.json").read_text())
    assert found["regularizer"] == "growing"
    # the planned channels were zero: pruning costs at most half a point
    assert found["accuracy_after_pruning"] >= found["accuracy_before_pruning"] - 0.005
    assert found["plan"]["macs_after"] < found["plan"]["macs_before"] / 2


def test_example_recipes_load(monkeypatch):
    # The example registers its stage on import; keep that registration inside this test.
    before = dict(STAGES)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("custom_stage", None)
    try:
        check_recipes(importlib.import_module("custom_stage"))
    finally:
        sys.modules.pop("custom_stage", None)
        STAGES.clear()
        STAGES.update(before)


def check_recipes(custom_stage) -> None:
    with pytest.raises(cz.RecipeError, match="label_smoothing"):
        custom_stage.FineTune(label_smoothing=1.0)
    recipes = sorted((EXAMPLES / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert cz.Pipeline.from_recipe(path).stages
