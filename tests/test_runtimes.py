"""Runtime rows: model.onnx and the artifact measured in every installed ONNX runtime.

Real ONNX Runtime and OpenVINO sessions; OpenVINO tests skip with a reason where the
``compressor[openvino]`` extra is missing (CI installs it, so they run there).
"""

import copy
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

import compressor as cz
from compressor.cli import main
from compressor.errors import UserError
from compressor.pipeline.rows import in_other_runtimes
from compressor.row import Row
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import onnx_predictor, top1
from compressor.runtime.parity import compare_outputs
from compressor.runtime.runtimes import check_runtimes, deployment_snippet, installed_runtimes
from compressor.stage import standalone_context

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="OpenVINO is not installed (pip install 'compressor[openvino]')",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained_resnet, data):
    """Pruning + INT8 with the default runtimes (every installed one)."""
    out = tmp_path_factory.mktemp("runtimes")
    pipeline = cz.Pipeline([
        cz.StructuredPruning(ratio=0.5, round_to=8),
        cz.Int8Quantization(calibration_samples=64),
    ])  # fmt: skip
    result = pipeline.run(
        trained_resnet, *data, output_dir=out, progress=False, threads=1, throughput_batch=8
    )
    return result, json.loads((out / "report.json").read_text())


@needs_openvino
def test_openvino_rows_measure_both_files_with_their_own_accuracy(run, data):
    result, report = run
    rows = report["rows"]
    assert [(r["name"], r["runtime"], r["precision"]) for r in rows] == [
        ("baseline", "torch", "fp32"), ("baseline", "onnxruntime", "fp32"),
        ("baseline", "openvino", "fp32"), ("structured_pruning", "torch", "fp32"),
        ("int8_quantization", "openvino", "int8"), ("int8_quantization", "onnxruntime", "int8"),
    ]  # fmt: skip
    base_ov, final_ov, final_ort = rows[2], rows[4], rows[5]
    assert base_ov["details"]["file"] == "model.onnx"
    # model.onnx gives ONNX Runtime's answers in OpenVINO on the sample: its accuracy is taken
    # from the ONNX Runtime row, not computed again; the INT8 file is evaluated in each runtime
    assert base_ov["details"]["accuracy_from"]["runtime"] == "onnxruntime"
    assert base_ov["details"]["accuracy_from"]["parity"]["same_answers"]
    assert "accuracy_from" not in final_ov["details"]
    assert final_ov["details"]["file"] == final_ort["details"]["file"] == "model.int8.onnx"
    assert report["environment"]["openvino"]
    for row in (base_ov, final_ov):
        assert row["latency_ms"]["p50"] > 0 and row["throughput"]["batch_size"] == 8
        assert row["size_bytes"] == (result.output_dir / row["details"]["file"]).stat().st_size
        # the same number as OpenVINO's own full evaluation (the shortcut's, for base_ov)
        path = result.output_dir / row["details"]["file"]
        assert row["accuracy"] == top1(onnx_predictor(path, 1, "openvino"), cz.DataSpec(data[1]))
    # the FP32 file agrees across runtimes; the INT8 one agrees with FP32 as in ONNX Runtime
    assert base_ov["details"]["parity"]["max_abs_diff"] < 1e-3
    assert base_ov["accuracy"] == rows[1]["accuracy"]
    assert final_ov["details"]["parity"]["top1_agreement"] >= 0.9
    assert abs(final_ov["accuracy"] - final_ort["accuracy"]) <= 0.05
    assert final_ov["params"] == final_ort["params"] and final_ov["macs"] == final_ort["macs"]


@needs_openvino
def test_a_file_that_answers_differently_is_evaluated_not_trusted(run, data, tmp_path):
    """The accuracy shortcut never hides a file whose answers differ: an FP32 file that
    disagrees with model.onnx on the sample is evaluated in full in that runtime."""
    result, _ = run
    shutil.copy(result.output_dir / "model.onnx", tmp_path / "model.onnx")
    changed = copy.deepcopy(result.model).eval()  # the pruned model: other answers
    other = tmp_path / "other.onnx"
    export_onnx(changed, torch.randn(1, 3, 16, 16), other)
    _, ctx = standalone_context(
        changed, data[0], data[1], tmp_path, threads=1, runtimes=("onnxruntime", "openvino")
    )
    claimed = Row("baseline", "onnxruntime", "fp32", 0.123, None, None, 0, {}, {})
    (row,) = in_other_runtimes(other, claimed, ctx)
    assert row.runtime == "openvino" and "accuracy_from" not in row.details
    assert not row.details["parity"]["same_answers"]
    assert row.accuracy == top1(onnx_predictor(other, 1, "openvino"), cz.DataSpec(data[1]))
    assert row.accuracy != 0.123


def test_an_export_that_answers_differently_stops_the_run(trained_resnet, data, tmp_path):
    """A broken export (the file computes something else than the torch model) is caught by
    the export check before any accuracy is shared between the rows."""

    class ExportsDifferently(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = copy.deepcopy(trained_resnet)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            return out.flip(1) if torch.onnx.is_in_onnx_export() else out

    with pytest.raises(cz.ExportError, match="ONNX Runtime disagrees with torch"):
        cz.Pipeline([cz.Int8Quantization(calibration_samples=16)]).run(
            ExportsDifferently(), *data, output_dir=tmp_path, progress=False, threads=1
        )
    assert not (tmp_path / "report.json").exists()


def test_final_parity_reuses_the_evaluations(run, data):
    """The final file's parity comes from the outputs both files gave while evaluated, and
    equals running the comparison again over the eval data."""
    result, report = run
    again = compare_outputs(
        onnx_predictor(result.output_dir / "model.onnx", 1),
        onnx_predictor(result.onnx_path, 1),
        cz.DataSpec(data[1]),
    )
    parity = report["parity"]
    assert parity["samples"] == again["samples"] == len(data[1].dataset)
    for key in ("top1_agreement", "max_abs_diff", "mean_abs_diff"):
        assert parity[key] == pytest.approx(again[key], abs=1e-6)


def test_report_says_where_the_time_went(run):
    result, report = run
    seconds = report["seconds"]
    assert {"export", "pruning", "quantization", "measuring", "total"} <= set(seconds)
    parts = sum(v for k, v in seconds.items() if k != "total")
    assert parts == pytest.approx(seconds["total"], abs=0.5)
    line = (result.output_dir / "report.md").read_text().splitlines()
    assert any(x.startswith(f"Run time {seconds['total']:.1f} s: ") for x in line)


@needs_openvino
def test_summary_names_the_fastest_runtime_and_how_to_deploy_there(run):
    result, report = run
    rows, s = report["rows"], report["summary"]
    p50 = {(r["name"], r["runtime"]): r["latency_ms"]["p50"] for r in rows}
    assert set(s["runtimes"]) == {"onnxruntime", "openvino"}
    for runtime, entry in s["runtimes"].items():
        assert entry["p50_ms"] == p50["int8_quantization", runtime]
        ratio = p50["baseline", runtime] / p50["int8_quantization", runtime]
        assert entry["speedup_vs_fp32"] == pytest.approx(ratio, rel=1e-2)
    fastest = min(("onnxruntime", "openvino"), key=lambda r: p50["int8_quantization", r])
    assert s["fastest_runtime"] == fastest
    fp32 = min(v for (name, _), v in p50.items() if name == "baseline")
    assert s["speedup_vs_fastest_fp32"] == pytest.approx(
        fp32 / p50["int8_quantization", fastest], rel=1e-2
    )
    # the old fields still describe the final stage's own row (ONNX Runtime)
    assert s["final"] == "int8_quantization"
    assert s["speedup_vs_onnx"] == pytest.approx(
        p50["baseline", "onnxruntime"] / p50["int8_quantization", "onnxruntime"], rel=1e-2
    )
    md = (result.output_dir / "report.md").read_text()
    assert f"Fastest: {fastest}" in md and f"Deploy with {fastest}" in md
    assert deployment_snippet(fastest, "model.int8.onnx", 1) in md


@pytest.mark.parametrize("runtime", installed_runtimes())
def test_deployment_snippet_runs_the_artifact_as_measured(runtime, run, data, monkeypatch):
    result, _ = run
    monkeypatch.chdir(result.output_dir)
    batch = next(iter(data[1]))[0][:4].numpy()
    scope = {"batch": batch}
    exec(deployment_snippet(runtime, "model.int8.onnx", 1), scope)
    expected = onnx_predictor(result.onnx_path, 1, runtime)(torch.from_numpy(batch))
    np.testing.assert_allclose(scope["outputs"], expected.numpy(), rtol=0, atol=1e-5)


def test_onnxruntime_only_leaves_other_runtimes_out(trained_resnet, data, tmp_path):
    result = cz.Pipeline([cz.Int8Quantization(calibration_samples=32)]).run(
        trained_resnet,
        *data,
        output_dir=tmp_path,
        progress=False,
        threads=1,
        throughput_batch=8,
        runtimes=["onnxruntime"],
    )
    assert {r.runtime for r in result.report.rows} == {"torch", "onnxruntime"}
    assert set(result.report.summary["runtimes"]) == {"onnxruntime"}
    assert "Deploy with onnxruntime" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("runtimes", "message"),
    [
        (["tensorrt"], "unknown runtime 'tensorrt'; allowed: onnxruntime, openvino"),
        ("ort", "unknown runtime 'ort'; allowed: onnxruntime, openvino"),
    ],
)
def test_unknown_runtime_is_refused_before_any_work(
    runtimes, message, trained_resnet, data, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        cz.Pipeline([cz.Int8Quantization()]).run(
            trained_resnet, *data, output_dir=out, progress=False, runtimes=runtimes
        )
    assert not (out / "model.onnx").exists()


def test_a_runtime_not_installed_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    with pytest.raises(
        UserError,
        match=r"'openvino' is not installed here \(pip install 'compressor\[openvino\]'\)",
    ):
        check_runtimes(["openvino"])
    assert check_runtimes(None) == ("onnxruntime",)


@needs_openvino
def test_bench_measures_each_file_in_each_runtime(run, capsys):
    result, _ = run
    argv = ["bench", str(result.output_dir / "model.onnx"), str(result.onnx_path)]
    assert main([*argv, "--batch-sizes", "1", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for line in (
        "| model | onnxruntime | fp32 |",
        "| model | openvino | fp32 |",
        "| model.int8 | onnxruntime | int8 |",
        "| model.int8 | openvino | int8 |",
    ):
        assert line in out
    assert "p50 speedup vs model (onnxruntime): model (onnxruntime) 1.00x" in out
    assert (
        main([*argv, "--batch-sizes", "1", "--threads", "1", "--runtime", "openvino", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["runtime"] for r in rows] == ["onnxruntime", "openvino"] * 2


def test_cli_refuses_an_unknown_runtime(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "model.onnx", "--runtime", "tensorrt"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
