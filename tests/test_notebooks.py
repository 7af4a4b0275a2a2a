"""The notebooks: stored without outputs, and run end to end in a real Jupyter kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_your_model.ipynb", "03_recipes_and_cli.ipynb",
        "04_segmentation.ipynb", "05_own_training_loop.ipynb",
    ]  # fmt: skip
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_end_to_end(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    text = outputs_text(notebook)
    if path.stem.startswith("05"):  # the user's own loop: rows named by the user
        assert (
            "scheduled channels at zero: 100%" in text and "| int8 | onnxruntime | int8 |" in text
        )
        assert (tmp_path / "runs" / "own_loop" / "report.json").is_file()
        return
    assert "int8_quantization" in text
    if path.stem.startswith("01"):
        images = [
            o
            for c in notebook.cells
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert len(images) == 2  # both charts, inline
        assert (tmp_path / "runs" / "quickstart" / "report.html").is_file()
    if path.stem.startswith("02"):
        assert "structured_pruning.ratio must be" in text
        assert "macro-F1 after training" in text
    if path.stem.startswith("03"):
        assert (tmp_path / "runs" / "cli" / "model.int8.onnx").is_file()
        assert "unknown option 'ration'" in text
    if path.stem.startswith("04"):
        assert (tmp_path / "runs" / "segmentation" / "model.int8.onnx").is_file()
        assert "| mIoU |" in text and "'metric': 'miou'" in text
        assert "pixels where INT8 agrees with FP32" in text
