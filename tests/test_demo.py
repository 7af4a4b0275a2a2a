import importlib.util
import json

import pytest
from browser import assert_report_renders

from compressor.cli import main


@pytest.mark.slow
def test_the_demo_shows_real_compression(tmp_path):
    """`compressor compress` with no options: the acceptance numbers of the demo."""
    out = tmp_path / "demo"
    assert main(["compress", "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["name"], r["runtime"]): r for r in report["rows"]}
    base_onnx = rows[("baseline", "onnxruntime")]
    final = rows[("int8_quantization", "onnxruntime")]
    assert (out / "model.onnx").stat().st_size >= 4 * (out / "model.int8.onnx").stat().st_size
    assert final["latency_ms"]["p50"] < base_onnx["latency_ms"]["p50"]
    assert report["summary"]["accuracy_drop"] <= 0.02
    assert rows[("baseline", "torch")]["accuracy"] > 0.8  # the demo data means something
    assert report["parity"]["top1_agreement"] > 0.85
    # every installed runtime ran the artifact; the report says which to deploy with
    runtimes = ["onnxruntime"] + ["openvino"] * (importlib.util.find_spec("openvino") is not None)
    assert list(report["summary"]["runtimes"]) == runtimes[::-1]  # the final row comes last
    fastest = report["summary"]["fastest_runtime"]
    assert rows[("int8_quantization", fastest)]["latency_ms"]["p50"] == min(
        rows[("int8_quantization", r)]["latency_ms"]["p50"] for r in runtimes
    )
    assert f"Deploy with {fastest}" in (out / "report.md").read_text()
    assert_report_renders(out / "report.html", tmp_path, rows=len(report["rows"]))
