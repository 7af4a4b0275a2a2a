"""The report: measurement, diagnosis, report.html in a real browser, `report` and `bench`."""

import json
import time

import pytest
import torch
from browser import assert_report_renders
from conftest import TinyResNet, fit, synthetic_classification
from torch.utils.data import DataLoader

import compressor as cz
from compressor.cli import main
from compressor.data import as_data_spec
from compressor.quantization.onnx_edits import inspect_int8_graph
from compressor.report.bench import bench
from compressor.report.diagnosis import diagnose
from compressor.report.report import Report, Row
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import (
    CallTimes,
    PeakMemory,
    environment,
    interleaved_runs,
    measure_onnx,
    timed_runs,
    top1,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    """A real pipeline run: pruning, then INT8, measured at two throughput batch sizes."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = fit(TinyResNet(), data[0])
    pipeline = cz.Pipeline([
        cz.StructuredPruning(ratio=0.5, round_to=8),
        cz.Int8Quantization(calibration_samples=64),
    ])  # fmt: skip
    pipeline.run(
        model,
        *data,
        output_dir=out,
        progress=False,
        threads=1,
        throughput_batch=(8, 16),
        runtimes=["onnxruntime"],  # tests/test_runtimes.py covers the others
    )
    return out


def test_rows_carry_stable_latency_throughput_list_memory_and_parity(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for row in report["rows"]:
        assert row["latency_ms"]["repeats"] >= 20
        assert isinstance(row["latency_ms"]["stable"], bool)
        assert row["throughput"]["batch_size"] == 8
        assert [t["batch_size"] for t in row["throughput_by_batch"]] == [8, 16]
        assert row["memory"]["peak_rss_bytes"] > row["memory"]["increase_bytes"] >= 0
    parity = report["parity"]
    assert parity["reference"] == "model.onnx" and parity["artifact"] == "model.int8.onnx"
    assert parity["samples"] == 128
    assert 0.5 < parity["top1_agreement"] <= 1.0
    assert parity["max_abs_diff"] >= parity["mean_abs_diff"] > 0
    env = report["environment"]
    assert {"cpu_features", "int8_instructions", "onnx", "threads"} <= set(env)
    assert env["threads"] == 1
    assert report["diagnosis"]["status"] in ("ok", "warning")
    assert "samples/s (bs 16)" in (run_dir / "report.md").read_text()


def test_report_html_renders_table_and_charts_in_a_browser(run_dir, tmp_path):
    html = (run_dir / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing to fetch
    page = assert_report_renders(run_dir / "report.html", tmp_path, rows=4)
    assert page["rows"][-1][:3] == ["int8_quantization", "onnxruntime", "int8"]


def test_charts_are_figures_with_one_point_or_bar_per_row(run_dir):
    report = Report.load(run_dir / "report.json")
    charts = report.charts()
    assert set(charts) == {"accuracy_latency", "per_stage"}
    points = charts["accuracy_latency"].axes[0].collections
    assert len(points) == len(report.rows) == 4
    assert [len(ax.patches) for ax in charts["per_stage"].axes] == [4, 4, 4]


def test_measuring_the_same_onnx_file_twice_gives_close_medians(run_dir):
    first = bench([run_dir / "model.int8.onnx"], batch_sizes=[1], threads=1).rows[0]
    second = bench([run_dir / "model.int8.onnx"], batch_sizes=[1], threads=1).rows[0]
    ratio = first.latency_ms["p50"] / second.latency_ms["p50"]
    assert 0.5 < ratio < 2.0, (first.latency_ms, second.latency_ms)


def test_the_evaluation_pass_gives_the_throughput_at_its_batch_size(run_dir):
    """Batch 8 is what the evaluation calls had: its throughput comes from them (7 calls
    after the first) and agrees with a timed loop; batch 16 is timed as before."""
    spec = as_data_spec(DataLoader(synthetic_classification(64, seed=2), batch_size=8), "data")
    settings = {"name": "int8", "precision": "int8", "data": spec, "eval_fn": top1}
    settings |= {"params": None, "macs": None, "threads": 1, "throughput_batches": [8, 16]}
    evaluated = measure_onnx(run_dir / "model.int8.onnx", **settings)
    looped = measure_onnx(
        run_dir / "model.int8.onnx", known_accuracy=evaluated.accuracy, **settings
    )
    by8, by16 = evaluated.throughput_by_batch
    assert (by8["from"], by8["calls"], by8["batch_size"]) == ("evaluation", 7, 8)
    assert "from" not in by16 and all("from" not in t for t in looped.throughput_by_batch)
    ratio = by8["samples_per_s"] / looped.throughput_by_batch[0]["samples_per_s"]
    assert 0.4 < ratio < 2.5, (by8, looped.throughput_by_batch)


def test_call_times_use_the_calls_of_one_size_after_the_first():
    calls = CallTimes()
    predict = calls.wrap(lambda x: time.sleep(0.002 * len(x) / 8) or x)
    for size in [8] * 5 + [3]:
        predict(torch.zeros(size, 2))
    assert calls.throughput(8) is None  # 4 calls after the warm-up: too few
    predict(torch.zeros(8, 2))
    found = calls.throughput(8)
    assert found["calls"] == 5 and found["from"] == "evaluation"
    assert 1000 < found["samples_per_s"] <= 4000  # 8 rows in at least 2 ms
    assert calls.throughput(3) is None and calls.throughput(16) is None


def test_timed_runs_stops_once_the_median_is_stable():
    timing = timed_runs(lambda: time.sleep(0.001), min_time_s=0.05, max_time_s=5.0)
    assert timing.stable
    assert 20 <= len(timing.times) < 1000
    assert 0.001 <= timing.median < 0.01


def test_interleaved_runs_alternate_the_runs_round_by_round():
    order: list[str] = []

    def sleeper(key: str, seconds: float):
        def run() -> None:
            order.append(key)
            time.sleep(seconds)

        return run

    timings = interleaved_runs(
        {"short": sleeper("short", 0.001), "long": sleeper("long", 0.004)},
        rounds=3,
        min_time_s=0.02,
        max_time_s=1.0,
    )
    assert 0.001 <= timings["short"].median < timings["long"].median
    assert all(t.stable and len(t.times) >= 3 * 20 for t in timings.values())
    blocks = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert blocks == ["short", "long"] * 3


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as memory:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched
        del block
    found = memory.to_dict()
    if found is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert found["increase_bytes"] > 50e6


def _row(name, runtime, precision, accuracy, p50, details=None):
    return Row(
        name,
        runtime,
        precision,
        accuracy,
        1000,
        2000,
        4000,
        {"batch_size": 1, "p50": p50, "p95": p50},
        {"batch_size": 32, "samples_per_s": 1.0},
        details=details or {},
    )


AVX2_ONLY = {"cpu": "Some x86", "machine": "x86_64", "cpu_features": ["avx2"], "threads": 2}


def test_diagnosis_names_the_causes_of_a_slow_int8_model():
    quant = {
        "activation_type": "int8",
        "speedup_vs_fp32_onnx": 0.8,
        "float_compute_ops": ["/layer1/conv1/Conv (Conv)", "/fc/Gemm (Gemm)"],
        "unfused_qdq": 6,
    }
    rows = [
        _row("baseline", "torch", "fp32", 0.90, 4.0),
        _row("baseline", "onnxruntime", "fp32", 0.90, 1.0),
        _row("int8_quantization", "onnxruntime", "int8", 0.895, 1.25, {"quantization": quant}),
    ]
    found = diagnose(rows, AVX2_ONLY)
    assert found["status"] == "warning"
    problems, causes = " ".join(found["problems"]), " ".join(found["causes"])
    assert "not faster than the FP32 ONNX baseline" in problems
    assert "0.80x" in problems
    assert "no INT8 dot-product instructions" in causes
    assert "uint8 activations" in causes
    assert "2 compute op(s) still run in FP32: /layer1/conv1/Conv (Conv)" in causes
    assert "6 QuantizeLinear/DequantizeLinear" in causes
    md = Report(rows, AVX2_ONLY).to_markdown()
    assert md.startswith("**Warning:**")


def test_diagnosis_and_summary_cover_every_runtime():
    vnni = {**AVX2_ONLY, "cpu_features": ["avx2", "avx512_vnni"], "threads": 2}
    rows = [
        _row("baseline", "torch", "fp32", 0.90, 4.0),
        _row("baseline", "onnxruntime", "fp32", 0.90, 2.0),
        _row("baseline", "openvino", "fp32", 0.90, 1.0),
        _row("int8_quantization", "openvino", "int8", 0.895, 1.5, {"file": "model.int8.onnx"}),
        _row("int8_quantization", "onnxruntime", "int8", 0.895, 0.5, {"file": "model.int8.onnx"}),
    ]
    found = diagnose(rows, vnni)
    assert found["problems"] == [
        "In openvino, the final model (int8_quantization) is not faster than the FP32 "
        "baseline: 1.500 ms vs 1.000 ms p50 at batch 1."
    ]
    report = Report(rows, vnni)
    s = report.summary
    assert s["speedup_vs_onnx"] == 4.0  # the final stage's own row, in ONNX Runtime
    assert s["runtimes"]["openvino"] == {"p50_ms": 1.5, "speedup_vs_fp32": 0.667, "accuracy": 0.895}
    assert (s["fastest_runtime"], s["fastest_fp32_runtime"]) == ("onnxruntime", "openvino")
    assert s["speedup_vs_fastest_fp32"] == 2.0
    assert report.row("int8_quantization", "openvino") is rows[3]
    with pytest.raises(KeyError, match="no row 'int8_quantization' in torch; rows: baseline"):
        report.row("int8_quantization", "torch")
    runtime, code = report.deployment()
    assert runtime == "onnxruntime" and "options.intra_op_num_threads = 2" in code
    assert 'id="deploy"' in report.to_html() and "Deploy with onnxruntime" in report.to_markdown()
    # a report of torch stages only has no runtime summary and no snippet
    torch_only = Report([*rows[:3], _row("structured_pruning", "torch", "fp32", 0.9, 2.0)], vnni)
    assert "runtimes" not in torch_only.summary and torch_only.deployment() is None


def test_diagnosis_points_at_the_stage_that_lost_accuracy():
    rows = [
        _row("baseline", "torch", "fp32", 0.90, 4.0),
        _row("baseline", "onnxruntime", "fp32", 0.90, 2.0),
        _row("structured_pruning", "torch", "fp32", 0.60, 2.0),
        _row("distillation", "torch", "fp32", 0.85, 2.0),
        _row("int8_quantization", "onnxruntime", "int8", 0.84, 0.5),
    ]
    vnni = {**AVX2_ONLY, "cpu_features": ["avx2", "avx512_vnni"]}
    found = diagnose(rows, vnni)
    assert len(found["problems"]) == 1 and "fell by 6.00 points" in found["problems"][0]
    assert any(
        c.startswith("structured_pruning lost 30.00 points (0.9000 -> 0.6000), the most of any")
        for c in found["causes"]
    )
    assert diagnose(rows, vnni, accuracy_threshold=0.1)["status"] == "ok"
    assert any("Put sparsity_training before it" in c for c in found["causes"])
    assert any("lower structured_pruning.ratio" in c for c in found["causes"])
    # with sparsity before it, and pruning to a target: what that run can change
    target = {"option": "target_latency_ms", "value": 0.15}
    pruning = {"pruning": {"removed_at_zero_fraction": 0.7051, "target": target}}
    rows = [
        *rows[:2],
        _row("sparsity_training", "torch", "fp32", 0.90, 4.0),
        _row("structured_pruning", "torch", "fp32", 0.60, 2.0, pruning),
        *rows[3:],
    ]
    (cause,) = [c for c in diagnose(rows, vnni)["causes"] if c.startswith("structured_pruning")]
    assert "zeroed only 71% of the channels pruning removed" in cause
    assert "relax the pruning target (target_latency_ms 0.15)" in cause
    assert "Put sparsity_training" not in cause
    rows[2] = _row("sparsity_training", "torch", "fp32", 0.70, 4.0)
    (cause,) = [c for c in diagnose(rows, vnni)["causes"] if c.startswith("sparsity_training")]
    assert cause.endswith("or relax the pruning target (target_latency_ms 0.15).")
    assert "sparsity_training.alpha" in cause and "optimizer: probe" in cause
    details = {"sparsity": {"alpha": 0.7}}  # it already learns from the original model
    rows[2] = _row("sparsity_training", "torch", "fp32", 0.70, 4.0, details)
    (cause,) = [c for c in diagnose(rows, vnni)["causes"] if c.startswith("sparsity_training")]
    assert "sparsity_training.alpha" not in cause and "more epochs" in cause
    # below the threshold, the stage that lost the most is still named, and only it
    rows = [*rows[:2], _row("sparsity_training", "torch", "fp32", 0.896, 4.0),
            _row("structured_pruning", "torch", "fp32", 0.894, 2.0),
            _row("distillation", "torch", "fp32", 0.8955, 2.0),
            _row("int8_quantization", "onnxruntime", "int8", 0.885, 0.5)]  # fmt: skip
    causes = diagnose(rows, vnni, accuracy_threshold=0.01)["causes"]
    assert [c.split(" lost")[0] for c in causes] == ["int8_quantization"]
    assert "the most of any stage" in causes[0]


def test_inspecting_a_graph_quantized_without_preprocessing_finds_fp32_convs(tmp_path):
    # Without quant_pre_process, convs whose folded bias is not an initializer stay FP32 in
    # ONNX Runtime: a real case of the causes the diagnosis names.
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(16, 3, 16, 16)
    export_onnx(model, x[:1], tmp_path / "m.onnx")

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": x.numpy()}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(tmp_path / "m.onnx"),
        str(tmp_path / "q.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],  # the head (Gemm) stays FP32 on purpose
    )
    graph = inspect_int8_graph(tmp_path / "q.onnx", 1, tmp_path / "opt.onnx")
    assert graph["int8_compute_ops"] >= 1
    assert any("Gemm" in op for op in graph["float_compute_ops"])
    assert graph["unfused_qdq"] >= 1


def test_report_command_rerenders_md_and_html(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "report.json").write_text((run_dir / "report.json").read_text())
    assert main(["report", str(copy), "--accuracy-threshold", "0.5"]) == 0
    assert (copy / "report.md").read_text() in capsys.readouterr().out
    assert "<svg" in (copy / "report.html").read_text()
    assert json.loads((copy / "report.json").read_text()) == json.loads(
        (run_dir / "report.json").read_text()
    )  # report.json itself is left as it was


def test_bench_command_prints_the_same_table_side_by_side(run_dir, capsys):
    argv = ["bench", str(run_dir / "model.onnx"), str(run_dir / "model.int8.onnx")]
    argv += ["--runtime", "onnxruntime"]
    assert main([*argv, "--batch-sizes", "1", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| model | onnxruntime | fp32 | n/a |" in out
    assert "| model.int8 | onnxruntime | int8 | n/a |" in out
    assert "samples/s (bs 4)" in out and "p50 speedup vs model: model 1.00x" in out
    assert main([*argv[:2], "--batch-sizes", "1", "--json", "--threads", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["params"] > 1000 and rows[0]["throughput"]["batch_size"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "missing.onnx"], "ONNX file 'missing.onnx' does not exist"),
        (["bench", "{onnx}", "--batch-sizes", "0"], "batch sizes must be >= 1 (got: [0])"),
        (["bench", "{onnx}", "--input-shape", "3", "8"], "does not fit model.onnx's input"),
        (["bench", "{json}"], "ONNX Runtime cannot load"),
        (["report", "{onnx}"], "is not JSON"),
        (["report", "missing/report.json"], "cannot read report"),
    ],
)
def test_report_and_bench_user_errors(argv, message, run_dir, capsys):
    files = {"onnx": str(run_dir / "model.onnx"), "json": str(run_dir / "report.json")}
    assert main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_report_environment_names_int8_instructions():
    env = environment(2)
    assert env["threads"] == 2 and env["compressor"] == cz.__version__
    assert isinstance(env["int8_instructions"], str) and env["int8_instructions"]
