"""What makes a reported number trustworthy: unsettled timings are flagged where people
read, and files over 2 GB (weights beside the .onnx) are counted, moved and removed whole."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.data import DataSpec
from compressor.pipeline.output_folder import LOCK_NAME, run_folder
from compressor.report.diagnosis import diagnose
from compressor.report.report import Report, Row
from compressor.runtime.measure import measure_onnx
from compressor.runtime.onnx_files import external_files, onnx_size


def _row(name, runtime, precision, p50, stable=True):
    latency = {"batch_size": 1, "p50": p50, "p95": p50, "stable": stable}
    return Row(name, runtime, precision, 0.9, 10, 20, 4000, latency, {"batch_size": 8})


def test_an_unsettled_timing_is_flagged_in_the_table_the_text_and_the_diagnosis():
    rows = [
        _row("baseline", "torch", "fp32", 4.0),
        _row("baseline", "onnxruntime", "fp32", 1.0, stable=False),
        _row("int8_quantization", "onnxruntime", "int8", 0.5),
    ]
    report = Report(rows, {"threads": 2})
    markdown = report.to_markdown()
    assert "| 1.000† |" in markdown and "| 0.500 |" in markdown
    assert "† The timing of baseline (onnxruntime fp32) did not settle" in markdown
    assert any("did not settle" in p for p in diagnose(rows, {})["problems"])
    assert "did not settle" in report.to_html()
    # rows written before the flag existed count as settled
    old = Report([_row("baseline", "torch", "fp32", 4.0)], {})
    del old.rows[0].latency_ms["stable"]
    assert "†" not in old.to_markdown()


def test_the_summary_leads_with_the_speedup_over_onnx_runtime():
    rows = [
        _row("baseline", "torch", "fp32", 4.0),
        _row("baseline", "onnxruntime", "fp32", 1.0),
        _row("int8_quantization", "onnxruntime", "int8", 0.5),
    ]
    line = Report(rows, {}).summary_line()
    assert line.index("ONNX Runtime FP32") < line.index("eager torch FP32")
    assert "2.00x faster than ONNX Runtime FP32 (the fair baseline), 8.00x" in line


def _external_model(folder, name="model.onnx", tensor_file="weights.bin"):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 1e4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "external",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=tensor_file, size_threshold=0)
    return path


def test_sizes_count_the_tensor_files_beside_the_onnx_file(tmp_path):
    path = _external_model(tmp_path)
    assert external_files(path) == [tmp_path / "weights.bin"]
    assert path.stat().st_size < 1000  # the protobuf holds no weights
    assert onnx_size(path) == path.stat().st_size + 64 * 64 * 4
    data = DataSpec([(torch.randn(8, 64), None)])
    row = measure_onnx(
        path, name="baseline", precision="fp32", data=data, eval_fn=None, params=4096,
        macs=None, threads=1, throughput_batches=[8],
    )  # fmt: skip
    assert row.size_bytes == onnx_size(path)
    # a location outside the file's folder is not ours to count
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "../elsewhere.bin"
    onnx.save(model, str(tmp_path / "odd.onnx"))
    assert external_files(tmp_path / "odd.onnx") == []


def test_a_new_result_brings_its_tensor_files_and_removes_the_old_ones(tmp_path):
    out = tmp_path / "out"
    with run_folder(out) as folder:
        _external_model(folder.staging, tensor_file="old.bin")
        (folder.staging / "report.json").write_text("{}")
        folder.promote(["model.onnx", "report.json"])
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME) == [
        "model.onnx", "old.bin", "report.json"
    ]  # fmt: skip
    with run_folder(out) as folder:
        _external_model(folder.staging, tensor_file="new.bin")
        (folder.staging / "report.json").write_text("{}")
        folder.promote(["model.onnx", "report.json"])
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME) == [
        "model.onnx", "new.bin", "report.json"
    ]  # fmt: skip
    loaded = onnx.load(str(out / "model.onnx"))  # the weights came along
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (64, 64)
