"""The benchmark scripts run from a clean checkout, shortened; their numbers live in benchmarks/."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import network_namespace

import compressor as cz
from compressor.pruning.structured import clearly_better

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

pytestmark = pytest.mark.slow
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_latency_script(tmp_path):
    out = tmp_path / "latency.json"
    args = ["resnet18", "--input-size", "64", "--batch-sizes", "1", "--rounds", "1"]
    args += ["--runtimes", "onnxruntime", *(["openvino"] if HAS_OPENVINO else [])]
    table = run("latency.py", *args, "--no-peers", "--out", str(out), cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    ours = ["fp32", "int8 (compressor)", "pruned 0.5 + int8 (compressor)"]
    assert [r["variant"] for r in rows] == [
        "torch fp32", "ort fp32", "ort int8 (compressor)", "pruned 0.5 + int8 (compressor)"
    ] + [f"openvino {v}" for v in ours] * HAS_OPENVINO  # fmt: skip
    assert [r["runtime"] for r in rows] == ["torch"] + ["onnxruntime"] * 3 + [
        "openvino"
    ] * 3 * HAS_OPENVINO
    assert rows[3]["macs"] < 0.3 * rows[1]["macs"]
    # every conv and the head in INT8, except the nodes placement kept in FP32 by timing
    kept = len(rows[2]["fp32_nodes"])
    assert rows[2]["int8_ops"] == 21 - kept and rows[2]["fp32_ops"] == kept <= 1
    fastest = min(r["p50"] for r in rows if r["variant"].endswith("fp32"))
    assert all(r["speedup_vs_fastest_fp32"] == round(fastest / r["p50"], 2) for r in rows)
    assert "| resnet18 | pruned 0.5 + int8 (compressor) | 1 |" in table
    if HAS_OPENVINO:
        assert "| resnet18 | openvino pruned 0.5 + int8 (compressor) | 1 |" in table


def test_int8_knobs_script(tmp_path):
    out = tmp_path / "knobs.json"
    run(
        "int8_knobs.py",
        "resnet18",
        "--input-size",
        "64",
        "--rounds",
        "1",
        "--round-to",
        "16",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 10 + 1
    assert all(r["p50"] > 0 for r in rows)


def test_pipeline_cost_script(tmp_path):
    out = tmp_path / "cost.json"
    args = ["--calibration-samples", "32", "--eval-samples", "32", "--runtimes", "onnxruntime"]
    args += ["--out", str(out)]
    table = run("pipeline_cost.py", *args, cwd=tmp_path)
    data = json.loads(out.read_text())
    assert data["rows"][-1]["step"] == "total"
    assert data["rows"][-1]["seconds"] == data["settings"]["total_seconds"] > 0
    assert "int8: calibrate_quantize" in table and "measuring baseline (torch fp32)" in table


def test_op_profile_script(tmp_path):
    text = run("op_profile.py", "resnet18", "--runs", "5", cwd=tmp_path)
    assert "resnet18 FP32:" in text and "QLinearConv" in text
    # a file of its own, exported at 16x16 and profiled at 40x40
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    cz.export_onnx(net.eval(), torch.rand(1, 3, 16, 16), tmp_path / "net.onnx")
    text = run("op_profile.py", "--files", "net.onnx", "--size", "40", "--runs", "5", cwd=tmp_path)
    assert "net.onnx at 40x40" in text and "Conv" in text and "p50" in text


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def need_fashion_mnist() -> None:
    """Skip without Debian's Fashion-MNIST, except in CI, which must install it."""
    if not FASHION_MNIST.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's dataset-fashion-mnist (see .ci/run)")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")


def test_compose_script(tmp_path):
    """Library variants against the hand-written torch-pruning peer on real Fashion-MNIST
    images, pruned to the peer's MACs, shortened."""
    need_fashion_mnist()
    out = tmp_path / "compose.json"
    args = ["--models", "plain", "--variants", "sparsity", "no_sparsity", "peer", "--seeds", "0"]
    args += ["--at", "peer", "--train-images", "512", "--baseline-images", "2048"]
    args += ["--baseline-epochs", "1", "--test-images", "512", "--cache", str(tmp_path / "cache")]
    args += ["--out", str(out), "--data", str(tmp_path / "data")]
    table = run("compose.py", *args, cwd=tmp_path)
    data = json.loads(out.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == {"sparsity", "no_sparsity", "peer"}
    assert runs["sparsity"]["removed_at_zero"] == 1.0  # pruning removed what sparsity zeroed
    assert runs["sparsity"]["pruning_drop_points"] == pytest.approx(0.0, abs=1.0)
    assert all(r["macs_x"] > 3 for r in runs.values())
    # pruned to the peer's MACs: at most as many, counted the same way
    assert runs["sparsity"]["macs"] <= runs["peer"]["macs"] >= runs["no_sparsity"]["macs"]
    assert 0 < runs["peer"]["final_top1"] <= 1 and runs["sparsity"]["speedup_bs1"] > 0
    assert (
        "| plain | sparsity | peer_macs | 1 |" in table and "| plain | peer | ratio | 1 |" in table
    )


def test_timm_zoo_script(tmp_path):
    out = tmp_path / "timm.json"
    table = run("timm_zoo.py", "resnet18d", "--input-size", "32", "--out", str(out), cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "pass", row.get("reason")
    assert row["macs_after"] < row["macs_before"]
    assert row["int8_vs_fp32"]["cosine"] >= 0.98
    assert "| ResNet-D | resnet18d |" in table


def test_vit_heads_script(tmp_path):
    out = tmp_path / "heads.json"
    args = ["--model", "vit_b_32", "--seeds", "0", "--samples", "2", "--sharpen", "1"]
    run("vit_heads.py", *args, "--out", str(out), cwd=tmp_path)
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"] if "seed" not in r}
    assert (rows["whole"]["heads"], rows["whole"]["head_dim"]) == (8, 64)
    assert (rows["dims"]["heads"], rows["mixing"]["heads"]) == (12, 12)
    # restructured: the residual width is chosen apart from the heads; tied: 8 heads of 64
    assert rows["whole"]["hidden_dim"] != rows["whole_tied"]["hidden_dim"] == 512
    assert all(0 < r["macs_ratio"] < 0.6 for r in rows.values())


def test_load_script(tmp_path):
    args = [
        "--size",
        "32",
        "--levels",
        "1",
        "4",
        "--runs",
        "2",
        "--requests",
        "20",
        "--threads",
        "2",
    ]
    table = run("load.py", *args, "--seconds", "2", "--out", str(tmp_path), cwd=tmp_path)
    data = json.loads((tmp_path / "load_resnet18.json").read_text())
    *rows, last = data["rows"]
    assert len(rows) == 2 * 4 * 2  # two files, four settings, two levels
    summary = last["summary"]
    assert len(summary["ratios"]) == 2 and summary["ratio_median"] > 0
    assert summary["overhead_ms_median"] is not None
    assert "| final | 2x1 threads, batch<=32 wait<=2ms | 4 |" in table


def test_scale_script(tmp_path):
    out = tmp_path / "scale.json"
    args = ["resnet18", "--samples", "16", "32", "--runs", "1", "--threads", "1"]
    table = run("scale.py", *args, "--out", str(out), cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["samples"]) for r in rows] == [("resnet18", 16), ("resnet18", 32)]
    for row in rows:
        for stage in ("sparsity_training", "structured_pruning", "distillation"):
            assert row[stage]["seconds"] > 0
            assert row[stage]["peak_mb"] > 100  # torch and a ResNet-18 are in memory
    assert "| resnet18 |" in table


def test_int8_budget_script(tmp_path):
    """The INT8 accuracy budget on real Fashion-MNIST images, shortened to one seed."""
    need_fashion_mnist()
    out = tmp_path / "int8_budget.json"
    args = ["--seeds", "0", "--train-images", "10000", "--test-images", "1000"]
    args += ["--data", str(tmp_path / "data"), "--out", str(out)]
    table = run("int8_budget.py", *args, cwd=tmp_path)
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "outlier"}
    for row in rows.values():  # within half a point of the FP32 model before INT8
        assert row["met"] and row["final"] >= row["fp32"] - 0.005 - 1e-9
        if row["int8"] < row["fp32"] - 0.005:
            assert 1 <= row["fp32_nodes"] < row["nodes"]  # a few nodes back, not all
    assert "| outlier | 0 |" in table


def test_qat_script(tmp_path):
    """Quantization-aware training against PTQ and FP32 fallback, shortened to one seed."""
    need_fashion_mnist()
    out = tmp_path / "qat.json"
    args = ["--models", "outlier", "--seeds", "0", "--train-images", "4000"]
    args += ["--test-images", "500", "--data", str(tmp_path / "data"), "--out", str(out)]
    table = run("qat.py", *args, cwd=tmp_path)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ptq", "ptq_fp32", "qat", "auto"}
    assert rows["ptq"]["drop_points"] > 2  # the outlier costs calibrated INT8 points
    assert rows["qat"]["accuracy"] > rows["ptq"]["accuracy"]  # training wins part back
    assert rows["qat"]["accuracy"] == pytest.approx(rows["qat"]["qat_torch_accuracy"], abs=0.01)
    assert rows["qat"]["fp32_nodes"] == 0 and rows["ptq_fp32"]["fp32_nodes"] >= 1
    assert rows["ptq_fp32"]["budget_met"] and rows["auto"]["budget_met"]
    assert all(r["onnxruntime_vs_fp32"] > 0 for r in rows.values())
    assert "| outlier | 0 | qat |" in table


def test_pruning_target_script(tmp_path):
    """The latency target on ResNet-18, shortened to one seed at 96x96."""
    out = tmp_path / "pruning_target.json"
    table = run(
        "pruning_target.py", "--seeds", "0", "--size", "96", "--out", str(out), cwd=tmp_path
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["target_ms"] == pytest.approx(row["ratio_0.5_ms"] / 3, rel=0.01)
    assert row["fraction"] == pytest.approx(1 / 3, abs=1e-4)
    met = [c for c in row["trace"] if c["value"] <= row["target_ms"]]
    if met:  # the least pruning among the candidates that met it was chosen
        assert row["ratio"] == min(c["ratio"] for c in met)
    assert row["final_ms"] > 0 and row["macs"] < row["macs_ratio_0.5"]
    assert "| median |" in table


def test_budget_search_script(tmp_path):
    """The budgeted ratio search on real Fashion-MNIST images, one model and seed, shortened."""
    need_fashion_mnist()
    out = tmp_path / "budget_search.json"
    args = ["--models", "plain", "--seeds", "0", "--train-images", "512", "--minutes", "0.5"]
    args += ["--baseline-epochs", "1", "--budget", "0.02", "--test-images", "1000"]
    args += ["--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache")]
    table = run("budget_search.py", *args, "--out", str(out), cwd=tmp_path)
    rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"balanced", "search", "harsh"}
    search = rows["search"]
    assert search["trace"] and search["trace"][0]["ratio"] == 0.5
    assert search["budget_met"] == search["within_budget"]
    harsh = rows["harsh"]
    if not harsh["budget_met"]:  # over budget: the artifact's name and the message say so
        assert harsh["artifact"] == "model.int8.over-budget.onnx"
        assert "Accuracy budget NOT met" in harsh["message"]
    assert "| plain | search | 1 |" in table


def test_importance_choice_script(tmp_path):
    """``auto`` at half the demo model's MACs: both rankings tried, LAMP kept only when it
    scores clearly higher than BatchNorm scale (beyond the two scores' sampling noise)."""
    out = tmp_path / "importance.json"
    args = ["--models", "demo", "--importances", "auto", "--demo-epochs", "1"]
    args += ["--demo-images", "1024", "--cache", str(tmp_path / "cache")]
    table = run("importance_choice.py", *args, "--out", str(out), cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    trials = {t["importance"]: t for t in row["trials"]}
    assert list(trials) == ["bn_scale", "lamp"]
    first, second = trials["bn_scale"], trials["lamp"]
    best = second if clearly_better(second["score"], first["score"], row["samples"]) else first
    assert row["samples"] > 0
    assert row["chosen"] == best["importance"] and row["ratio"] == best["ratio"]
    assert row["macs_x"] >= 1.99 and 0 < row["pruned"] <= 1
    assert f"| demo | top1 | auto | {row['chosen']} |" in table


def test_latency_allocation_script(tmp_path):
    """Latency-aware against uniform allocation on ResNet-18, one seed at 64x64."""
    out = tmp_path / "latency_allocation.json"
    args = ["--seeds", "0", "--size", "64", "--rounds", "1", "--threads", "1"]
    table = run("latency_allocation.py", *args, "--out", str(out), cwd=tmp_path)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"uniform", "global", "latency"}
    assert rows["latency"]["costs"] and rows["uniform"]["costs"] is None
    for row in rows.values():  # each pruned and timed
        assert row["macs_x"] > 1 and row["int8_p50_ms"] > 0
    # global's MACs follow the ratio smoothly; latency's jump by a round_to step of the
    # full-resolution group, which at 64x64 can be half the model (at 224 they matched: README)
    assert 0.8 <= rows["global"]["macs_vs_uniform"] <= 1.2
    assert "| median | latency |" in table


def test_segmentation_script(tmp_path):
    """LR-ASPP on Fashion-MNIST canvases through the pipeline and the peers' INT8, shortened."""
    need_fashion_mnist()
    out = tmp_path / "segmentation.json"
    args = ["--seeds", "0", "--baseline-epochs", "0", "--train-batches", "4"]
    args += ["--test-canvases", "64", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    args += ["--data", str(tmp_path / "data"), "--max-accuracy-drop", "0.9"]
    table = run("segmentation.py", *args, cwd=tmp_path)
    (found,) = json.loads(out.read_text())["runs"]
    assert found["budget_met"] is True  # the pipeline's budget, against the baseline
    assert found["model_io"] == {
        "task": "segmentation", "output": "out", "metric": "miou", "ignore_index": 255,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [3, 64, 64]}],
    }  # fmt: skip
    assert found["macs_x"] > 2 and 0 <= found["final_miou"] <= 1
    assert 0 <= found["agreement"] <= 1 and "ort_default" in found["peers"]
    assert all(ms > 0 for ms in found["p50_ms"].values())
    assert "| lraspp_mobilenet_v3_large | compressor: pruned + INT8 | 1 |" in table


def test_detection_script(tmp_path):
    """SSDlite on Fashion-MNIST detection canvases, the peers' INT8, shortened."""
    need_fashion_mnist()
    out = tmp_path / "detection.json"
    args = ["--seeds", "0", "--baseline-epochs", "0", "--train-batches", "2", "--input-size", "64"]
    args += ["--test-canvases", "32", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    args += ["--data", str(tmp_path / "data"), "--runtimes", "openvino"]
    table = run("detection.py", *args, cwd=tmp_path)
    (found,) = json.loads(out.read_text())["runs"]
    assert found["model_io"]["task"] == "detection" and found["model_io"]["metric"] == "map"
    assert len(found["model_io"]["detection"]["fp32_layers"]) == 12
    assert found["macs_x"] > 1.5 and 0 <= found["final_map"] <= 1
    assert 0 <= found["agreement"] <= 1 and "ort_default" in found["peers"]
    # ONNX Runtime always, OpenVINO besides: each scores and times the same files
    assert 0 <= found["final_map_openvino"] <= 1
    for runtime in ("p50_ms", "p50_ms_openvino"):
        assert set(found[runtime]) >= {"fp32", "compressor", "ort_default"}
        assert all(ms > 0 for ms in found[runtime].values())
    assert "| ssdlite320_mobilenet_v3_large | compressor: pruned + INT8 | 1 |" in table
    assert "| compressor: pruned + INT8 in openvino | 1 |" in table


def test_text_classification_script(tmp_path):
    """bert-tiny on the standard-library text through the pipeline and ORT's INT8, shortened."""
    pytest.importorskip("transformers")
    out = tmp_path / "text.json"
    args = ["--seeds", "0", "--baseline-epochs", "1", "--train-batches", "4", "--seq-len", "64"]
    args += ["--cache", str(tmp_path / "cache"), "--out", str(out)]
    table = run("text_classification.py", *args, cwd=tmp_path)
    (found,) = json.loads(out.read_text())["runs"]
    assert found["macs_x"] > 1 and 0 <= found["final_acc"] <= 1
    assert found["heads"]["heads_after"] < found["heads"]["heads_before"]
    assert found["int8_format"] in ("QDQ", "dynamic")
    assert set(found["peers"]) == {"ort_dynamic", "ort_static"}
    assert all(ms > 0 for ms in found["p50_ms"].values())
    assert "| compressor: pruned + INT8 | 1 |" in table


def test_ray_replicas_script(tmp_path):
    """compressor serve, one Ray replica and two, shortened, in a network namespace."""
    pytest.importorskip("ray.serve", reason="the ray extra: pip install 'compressor[ray]'")
    args = ["--runs", "1", "--levels", "2", "--requests", "20", "--seconds", "1", "--size", "32"]
    command = [*network_namespace(), sys.executable, str(BENCHMARKS / "ray_replicas.py")]
    done = subprocess.run(
        [*command, *args, "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "ray_replicas.json").read_text())["rows"]
    assert [r["front"].split()[0] for r in rows] == ["serve", "ray", "ray"]
    assert all(r["throughput"] > 0 and r["errors"] == 0 for r in rows)
    assert "| ray 2x" in done.stdout
