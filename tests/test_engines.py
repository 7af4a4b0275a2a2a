"""`compressor export triton` and `compressor export kserve`: a Triton model repository
checked against Triton's own ModelConfig schema (tritonclient's protobuf), and a KServe
InferenceService, both carrying the settings a real load test measured."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from conftest import two_input_model

from compressor.cli import main
from compressor.runtime.engines import check_triton_config
from compressor.runtime.load import load_file

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install tritonclient[grpc]")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A two-input file (float32 and int64) and what `compressor load --json` says of it."""
    folder = tmp_path_factory.mktemp("engines")
    path = two_input_model(folder / "two.onnx")
    result = load_file(path, levels=(1, 4), max_requests=40, max_seconds=2, p99_ms=5000)
    (folder / "load.json").write_text(json.dumps([result]))
    return path, folder / "load.json", result


def _setting(result):
    return next(s for s in result["settings"] if s["label"] == result["best"]["label"])


def _config(model_dir):
    config = check_triton_config((model_dir / "config.pbtxt").read_text())
    assert config is not None
    return config


def test_triton_repository_carries_the_measured_setting(measured, tmp_path, capsys):
    path, results, result = measured
    repo = tmp_path / "repo"
    assert main(["export", "triton", str(path), "--output", str(repo), "--settings-from",
                 str(results)]) == 0  # fmt: skip
    assert f"settings from {results}: {result['best']['label']}" in capsys.readouterr().out
    config, best = _config(repo / "two"), _setting(result)
    assert config["name"] == "two" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == best["max_batch"]
    inputs = {i["name"]: (i["data_type"], i["dims"]) for i in config["input"]}
    assert inputs == {"x": ("TYPE_FP32", ["4"]), "ids": ("TYPE_INT64", ["3"])}
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [("y", "TYPE_FP32")]
    assert config["instance_group"] == [{"count": best["sessions"], "kind": "KIND_CPU"}]
    assert config["parameters"]["intra_op_thread_count"]["string_value"] == str(best["threads"])
    if best["max_batch"] > 1:
        batching = config["dynamic_batching"]
        assert batching["preferred_batch_size"] == [best["max_batch"]]
        assert int(batching["max_queue_delay_microseconds"]) == round(best["max_wait_ms"] * 1e3)
    # the file Triton loads answers as the one measured
    feeds = {"x": np.ones((2, 4), np.float32), "ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    copied, source = (ort.InferenceSession(str(p)) for p in (repo / "two/1/model.onnx", path))
    np.testing.assert_array_equal(copied.run(None, feeds)[0], source.run(None, feeds)[0])


def test_flags_override_and_a_fixed_batch_keeps_full_shapes(tmp_path):
    fixed = two_input_model(tmp_path / "fixed.onnx", batch=1)
    repo = tmp_path / "repo"
    argv = ["export", "triton", str(fixed), "--output", str(repo), "--name", "m.v2"]
    assert main([*argv, "--sessions", "2", "--threads", "3", "--max-batch", "8"]) == 0
    config = _config(repo / "m.v2")
    assert config.get("max_batch_size", 0) == 0 and "dynamic_batching" not in config
    assert [i["dims"] for i in config["input"]] == [["1", "4"], ["1", "3"]]
    assert config["instance_group"][0]["count"] == 2
    assert config["parameters"]["intra_op_thread_count"]["string_value"] == "3"


def test_export_refuses_bad_input_and_never_overwrites(measured, tmp_path, capsys):
    path = measured[0]
    repo = tmp_path / "repo"
    assert main(["export", "triton", str(path), "--output", str(repo), "--max-batch", "4"]) == 0
    before = (repo / "two" / "config.pbtxt").read_text()
    kserve = ["kserve", str(path), "--output", str(tmp_path / "a.yaml"), "--storage-uri"]
    cases = [
        (["triton", str(path), "--output", str(repo)], "exists already"),
        (["triton", str(path), "--output", str(repo), "--name", "a b"], "model names must be"),
        (["triton", str(tmp_path / "none.onnx"), "--output", str(repo)], "no ONNX file"),
        (["triton", str(path), "--output", str(repo), "--max-batch", "0"], "--max-batch must"),
        (["triton", str(path), "--output", str(tmp_path / "r2"), "--settings-from", str(path)],
         "not readable JSON"),
        ([*kserve, "bucket/models"], "must be a URI"),
        ([*kserve, "s3://b/m", "--name", "Two_Model"], "KServe names must be"),
        ([*kserve, "s3://b/m", "--autoscale", "3:1"], "0 <= MIN <= MAX"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["export", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert (repo / "two" / "config.pbtxt").read_text() == before
    assert sorted(p.name for p in repo.iterdir()) == ["two"]  # no staging folder left
    assert not (tmp_path / "a.yaml").exists() and not (tmp_path / "r2" / "two").exists()


def test_kserve_manifest_has_the_fields_v1beta1_requires(measured, tmp_path):
    path, results, result = measured
    out = tmp_path / "isvc.yaml"
    argv = ["export", "kserve", str(path), "--output", str(out), "--storage-uri", "s3://b/repo"]
    assert main([*argv, "--settings-from", str(results), "--autoscale", "1:4"]) == 0
    manifest = yaml.safe_load(out.read_text())
    # required by KServe's InferenceService CRD (serving.kserve.io_inferenceservices.yaml):
    # apiVersion, kind, metadata.name, spec.predictor; a model needs modelFormat.name
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService" and manifest["metadata"]["name"] == "two"
    predictor = manifest["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://b/repo" and model["runtime"] == "kserve-tritonserver"
    best = _setting(result)
    cpus = str(best["sessions"] * best["threads"])
    assert model["resources"] == {"requests": {"cpu": cpus}, "limits": {"cpu": cpus}}
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["scaleTarget"] == result["best"]["concurrency"]
    assert main([*argv, "--replicas", "2"]) == 2  # the file exists: never overwritten
