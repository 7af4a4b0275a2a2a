"""`compressor serve --engine ray`: a real Ray Serve application with 2 replicas, started and
stopped inside a network namespace of its own (only loopback), under tritonclient and the
load test, with one replica's process killed during the load (tests/ray_run.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import network_namespace, two_input_model

from compressor.cli import main

pytest.importorskip("ray.serve", reason="the ray extra: pip install 'compressor[ray]'")
pytest.importorskip("tritonclient.http", reason="the test extra installs tritonclient")

ROOT = Path(__file__).parent.parent


def test_replicas_answer_right_under_load_and_survive_a_killed_one(tmp_path):
    out = tmp_path / "ray.json"
    command = [*network_namespace(), sys.executable, "tests/ray_run.py", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["interfaces"] == ["lo"]  # nothing Ray started could listen elsewhere
    assert len(found["replicas_before"]) == 2
    # 16 tritonclient streams, JSON and binary tensors: every answer is ONNX Runtime's own,
    # and both replicas answered
    triton = found["triton"]
    assert triton["requests"] == 16 * 12 and triton["mismatches"] == 0
    assert len(triton["replicas_seen"]) == 2
    assert found["statuses"] == {
        "good": 200,
        "wrong_dtype": 400,
        "missing_input": 400,
        "wrong_method": 405,
        "unknown_model": 404,
        "live": 200,
    }
    # a replica's process killed during the load: the failed requests are counted and few,
    # Ray starts another replica, and the answers stay right
    load = found["load"]
    assert len(load["killed"]) == 1 and load["requests"] > 50
    assert 0 <= load["errors"] <= 0.1 * load["requests"], load
    after = found["replicas_after"]
    assert len(after) == 2 and load["killed"][0] not in after
    assert found["after_restart"]["mismatches"] == 0
    assert found["after_restart"]["requests"] == 64


def test_serve_command_refuses_bad_engine_options(tmp_path, capsys):
    """Each refused before Ray starts (nothing listens, outside the namespace)."""
    model = two_input_model(tmp_path / "m.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    cases = [
        (["--replicas", "2"], "need --engine ray"),
        (["--engine", "ray", "--autoscale", "4"], "--autoscale must be MIN:MAX"),
        (["--engine", "ray", "--stop-after-requests", "3"], "not available with --engine ray"),
        (["--engine", "ray", "--replicas", "0"], "--replicas must be >= 1"),
        (["--engine", "ray", "--port", "0"], "needs a port from 1 to 65535"),
        (["--engine", "ray", "--replicas", "64", "--threads", "1"], "64 replica(s) x 1 thread"),
        (["--engine", "ray", "--sessions", "2"], "one session per replica"),
    ]
    for argv, message in cases:
        assert main(["serve", str(model), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["serve", str(tmp_path / "broken.onnx"), "--engine", "ray"]) == 2
    assert "does not load in onnxruntime" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()
