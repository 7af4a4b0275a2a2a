"""The dynamic batcher, the load test and `compressor serve`: real ONNX Runtime sessions, a
real HTTP server on 127.0.0.1 in its own process, real clients (urllib, tritonclient)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import two_input_model

from compressor.cli import main
from compressor.errors import UserError
from compressor.runtime.batching import BadRequest, BatchSettings, Busy, DynamicBatcher
from compressor.runtime.load import encode_request, load_file, load_url, to_markdown

pytest.importorskip("aiohttp", reason="the serve extra: pip install 'compressor[serve]'")


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    return two_input_model(tmp_path_factory.mktemp("serve") / "two.onnx")


def _rows(n: int, seed: int, width: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, width)).astype(np.float32),
        "ids": rng.integers(0, 100, (n, 3)).astype(np.int64),
    }


def _direct(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(two_inputs):
    settings = BatchSettings(max_batch=8, max_wait_ms=20, sessions=2, threads=1)
    requests = [_rows(1 + i % 3, seed=i) for i in range(24)]
    with DynamicBatcher(two_inputs, settings) as batcher:
        futures = [batcher.submit(r) for r in requests]
        answers = [f.result(timeout=30) for f in futures]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer.outputs["y"], _direct(two_inputs, request), rtol=1e-6)
        assert answer.batch_rows >= len(request["x"]) and answer.batch_rows <= 8
        assert answer.queue_ms >= 0 and answer.run_ms > 0
    assert max(a.batch_rows for a in answers) > 3  # requests were run together


def test_bad_requests_name_the_bad_value_and_what_is_allowed(two_inputs):
    with DynamicBatcher(two_inputs, BatchSettings(max_rows=4)) as batcher:
        good = _rows(1, 0)
        with pytest.raises(BadRequest, match=r"datatype float64, the model takes FP32"):
            batcher.submit({**good, "x": good["x"].astype(np.float64)})
        with pytest.raises(BadRequest, match=r"shape \[1, 5\], the model takes \[-1, 4\]"):
            batcher.submit({**good, "x": np.zeros((1, 5), np.float32)})
        with pytest.raises(BadRequest, match=r"do not match the model's inputs \['x', 'ids'\]"):
            batcher.submit({"x": good["x"]})
        with pytest.raises(BadRequest, match=r"disagree on the batch size: \[1, 2\]"):
            batcher.submit({**good, "ids": np.zeros((2, 3), np.int64)})
        with pytest.raises(BadRequest, match=r"holds 5 rows; allowed: 1 to 4"):
            batcher.submit(_rows(5, 0))
        np.testing.assert_allclose(batcher.run(good).outputs["y"], _direct(two_inputs, good))
    with pytest.raises(UserError, match=r"max_batch must be an integer >= 1 \(got: 0\)"):
        BatchSettings(max_batch=0)


def test_a_full_queue_answers_busy_at_once(tmp_path):
    slow = two_input_model(tmp_path / "slow.onnx", width=1024, layers=8)
    settings = BatchSettings(max_batch=1, sessions=1, threads=1, max_queue=2, max_rows=64)
    with DynamicBatcher(slow, settings) as batcher:
        first = batcher.submit(_rows(64, 0, width=1024))  # keeps the one session busy
        queued = []

        def submit_twenty() -> None:
            for i in range(20):
                queued.append(batcher.submit(_rows(1, i, width=1024)))

        with pytest.raises(Busy, match="2 requests are already waiting"):
            submit_twenty()
        # two wait (three if the session had not yet taken the first): the rest are refused
        assert len(queued) in (1, 2)
        # every accepted request is answered, also after close (it drains the queue)
    assert first.result().outputs["y"].shape == (64, 1024)
    assert all(f.result().outputs["y"].shape == (1, 1024) for f in queued)


def test_a_file_with_a_fixed_batch_size_runs_each_request_alone(tmp_path):
    fixed = two_input_model(tmp_path / "fixed.onnx", batch=1)
    with DynamicBatcher(fixed, BatchSettings(max_batch=16, max_wait_ms=5)) as batcher:
        assert batcher.fixed_batch == 1 and "fixes its batch size at 1" in batcher.note
        answers = [f.result() for f in [batcher.submit(_rows(1, i)) for i in range(6)]]
        assert {a.batch_rows for a in answers} == {1}
        with pytest.raises(BadRequest, match="allowed: exactly 1"):
            batcher.submit(_rows(2, 0))
    result = load_file(fixed, levels=[1, 4], max_requests=20, max_seconds=5)
    assert len(result["settings"]) == 1 and "fixes its batch size" in result["settings"][0]["note"]


def test_load_test_numbers_add_up(two_inputs):
    settings = [
        BatchSettings(max_batch=1, sessions=1, threads=1),
        BatchSettings(max_batch=8, max_wait_ms=5, sessions=1, threads=1),
    ]
    result = load_file(two_inputs, settings=settings, levels=[1, 8], max_requests=80)
    assert [e["label"] for e in result["settings"]] == [s.label for s in settings]
    for entry in result["settings"]:
        for level in entry["levels"]:
            lat = level["latency_ms"]
            assert level["requests"] == 80 and level["errors"] == 0
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
            assert level["throughput"] == pytest.approx(80 / level["seconds"], rel=1e-3)
            assert level["estimate"] > 0
    unbatched, batched = (e["levels"][-1] for e in result["settings"])
    assert unbatched["mean_batch"] == 1.0
    assert batched["mean_batch"] > 1.5  # 8 clients, 5 ms to gather them
    within = [lv for e in result["settings"] for lv in e["levels"] if lv["latency_ms"]["p99"] <= 50]
    best = result["best"]
    assert (
        best is None if not within else best["throughput"] == max(lv["throughput"] for lv in within)
    )
    text = to_markdown([result])
    assert "| two.onnx | 1x1 threads, no batching | 1 |" in text
    assert ("best within p99 50 ms" in text) == (best is not None)


@pytest.fixture(scope="module")
def server(two_inputs):
    """`compressor serve` in its own process on a free loopback port; stops by itself."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compressor",
            "serve",
            str(two_inputs),
            "--port",
            "0",
            "--max-batch",
            "8",
            "--max-wait-ms",
            "5",
            "--max-rows",
            "16",
            "--threads",
            "1",
            "--stop-after-s",
            "240",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if "serving two at" not in line:
        process.kill()
        pytest.fail(f"the server did not start: {line} {process.stderr.read()}")
    url = line.split(" at ")[1].split("/v2/")[0]
    assert url.startswith("http://127.0.0.1:")
    yield url, process
    if process.poll() is None:
        process.kill()
    process.wait(30)


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_server_speaks_the_v2_protocol(server, two_inputs):
    url, _ = server
    for path, want in [
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/two/ready", {"name": "two", "ready": True}),
    ]:
        with urllib.request.urlopen(url + path, timeout=30) as response:
            assert json.loads(response.read()) == want
    with urllib.request.urlopen(url + "/v2/models/two", timeout=30) as response:
        meta = json.loads(response.read())
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
    ]
    inputs = _rows(3, 7)
    body, headers = encode_request(inputs, binary=False)
    status, answer = _post(url + "/v2/models/two/infer", body, headers)
    assert status == 200 and answer["model_name"] == "two"
    (out,) = answer["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [3, 4]
    got = np.array(out["data"], np.float32).reshape(3, 4)
    np.testing.assert_allclose(got, _direct(two_inputs, inputs), rtol=1e-6)


def test_tritonclient_works_unchanged_under_concurrent_requests(server, two_inputs):
    httpclient = pytest.importorskip("tritonclient.http")
    url, _ = server
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("two")
    client.close()
    results, errors = {}, []

    def one_client(seed: int) -> None:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))  # one per thread
        try:
            for k in range(5):
                inputs = _rows(1 + (seed + k) % 4, seed=100 * seed + k)
                tensors = []
                for name, datatype in (("x", "FP32"), ("ids", "INT64")):
                    t = httpclient.InferInput(name, list(inputs[name].shape), datatype)
                    t.set_data_from_numpy(inputs[name], binary_data=seed % 2 == 0)
                    tensors.append(t)
                answer = client.infer("two", tensors)
                results[(seed, k)] = (inputs, answer.as_numpy("y"))
        except Exception as exc:  # reported below, with the client that saw it
            errors.append((seed, exc))
        finally:
            client.close()

    threads = [threading.Thread(target=one_client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 40
    for inputs, got in results.values():
        np.testing.assert_allclose(got, _direct(two_inputs, inputs), rtol=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("two", b"not json", {}, 400, "not JSON"),
        ("two", b"[1, 2]", {}, 400, 'JSON object with an "inputs" list'),
        ("nope", b'{"inputs": []}', {}, 404, "unknown model 'nope'"),
        (
            "two",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}',
            {},
            400,
            "data must be 4 FP32 numbers",
        ),
        (
            "two",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": []}]}',
            {},
            400,
            "datatype 'FP99' is not one of",
        ),
        (
            "two",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", '
            b'"data": [1, 2, 3, 4]}, {"name": "ids", "shape": [1, 3], "datatype": "INT64", '
            b'"data": [1, 2, 3]}]}',
            {},
            400,
            "datatype float64, the model takes FP32",
        ),
        (
            "two",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 16}}]}',
            {"Inference-Header-Content-Length": "WHOLE"},  # no binary part follows
            400,
            "binary_data_size 16 does not fit",
        ),
        ("two", b"{}", {"Inference-Header-Content-Length": "999"}, 400, "outside the body"),
        (
            "two",
            b'{"inputs": [{"name": "x", "shape": [99999999999, 4], "datatype": "FP32", '
            b'"data": [1]}]}',
            {},
            400,
            "data must be 399999999996 FP32 numbers",
        ),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_stays_up(
    server, path, body, headers, status, message
):
    url, _ = server
    headers = {k: str(len(body)) if v == "WHOLE" else v for k, v in headers.items()}
    got, answer = _post(f"{url}/v2/models/{path}/infer", body, headers)
    assert got == status
    assert message in answer["error"]
    with urllib.request.urlopen(url + "/v2/health/live", timeout=30) as response:
        assert response.status == 200


def test_too_many_rows_and_too_large_bodies_are_refused(server):
    url, _ = server
    body, headers = encode_request(_rows(17, 0), binary=True)
    status, answer = _post(url + "/v2/models/two/infer", body, headers)
    assert status == 400 and "holds 17 rows; allowed: 1 to 16" in answer["error"]
    status, answer = _post(url + "/v2/models/two/infer", b" " * 10_000_000)
    assert status == 413 and "at most" in answer["error"]


def test_a_load_test_through_http(server):
    url, _ = server
    result = load_url(url, "two", levels=[1, 4], max_requests=40, max_seconds=20)
    (entry,) = result["settings"]
    for level in entry["levels"]:
        assert level["requests"] == 40 and level["errors"] == 0
        assert level["latency_ms"]["p50"] > 0 and level["run_ms"] > 0
    assert entry["levels"][-1]["mean_batch"] >= 1


def test_sigterm_finishes_and_reports(two_inputs):
    process = subprocess.Popen(
        [sys.executable, "-m", "compressor", "serve", str(two_inputs), "--port", "0",
         "--stop-after-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    url = line.split(" at ")[1].split("/v2/")[0]
    body, headers = encode_request(_rows(2, 0), binary=True)
    status, _ = _post(url + "/v2/models/two/infer", body, headers)
    assert status == 200
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped after 1 infer request(s)" in out


def test_shutdown_answers_the_request_in_flight(tmp_path):
    slow = two_input_model(tmp_path / "slow.onnx", width=1024, layers=24)
    process = subprocess.Popen(
        [sys.executable, "-m", "compressor", "serve", str(slow), "--port", "0", "--threads",
         "1", "--stop-after-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = process.stdout.readline().split(" at ")[1].split("/v2/")[0]
    inputs = _rows(64, 0, width=1024)  # about a second of work on one thread
    body, headers = encode_request(inputs, binary=True)
    answers = []
    client = threading.Thread(
        target=lambda: answers.append(_post_binary(url + "/v2/models/slow/infer", body, headers))
    )
    client.start()
    threading.Event().wait(0.3)  # the request is in flight
    process.send_signal(signal.SIGTERM)
    client.join(60)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    ((status, outputs),) = answers
    assert status == 200
    np.testing.assert_allclose(outputs, _direct(slow, inputs), rtol=1e-5)
    assert "stopped after 1 infer request(s)" in out


def test_a_full_queue_answers_503_over_http(tmp_path):
    slow = two_input_model(tmp_path / "slow.onnx", width=1024, layers=8)
    process = subprocess.Popen(
        [sys.executable, "-m", "compressor", "serve", str(slow), "--port", "0", "--threads",
         "1", "--max-batch", "1", "--max-queue", "1", "--stop-after-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = process.stdout.readline().split(" at ")[1].split("/v2/")[0]
        body, headers = encode_request(_rows(64, 0, width=1024), binary=True)
        answers = []

        def send() -> None:
            answers.append(_post(url + "/v2/models/slow/infer", body, headers))

        clients = [threading.Thread(target=send) for _ in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(120)
        # one runs, one waits, the others are told at once that the server is busy
        statuses = [status for status, _ in answers]
        assert len(statuses) == 6 and 200 in statuses and 503 in statuses
        busy = [answer for status, answer in answers if status == 503]
        assert all("already waiting; retry later" in b["error"] for b in busy)
        status, _ = _post(url + "/v2/models/slow/infer", b"{", {})
        assert status == 400  # and it still answers
    finally:
        process.kill()
        process.wait(30)


def _post_binary(url: str, body: bytes, headers: dict) -> tuple[int, np.ndarray]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        header = json.loads(response.read())
    (out,) = header["outputs"]
    return response.status, np.array(out["data"], np.float32).reshape(out["shape"])


def test_load_and_serve_commands_refuse_bad_input(two_inputs, capsys):
    assert main(["load"]) == 2
    assert "give one or more MODEL.onnx files" in capsys.readouterr().err
    assert main(["load", "--url", "http://127.0.0.1:1"]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["load", "--url", "ftp://x", "--name", "m"]) == 2
    assert "must look like http://HOST:PORT" in capsys.readouterr().err
    assert main(["load", str(two_inputs), "--concurrency", "0"]) == 2
    assert "concurrency levels must be from 1 to 1024" in capsys.readouterr().err
    assert main(["serve", str(two_inputs), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main(["serve", "missing.onnx", "--port", "0", "--stop-after-s", "1"]) == 2
    assert "'missing.onnx' does not exist" in capsys.readouterr().err


def test_a_pipeline_run_reports_its_files_under_load(trained_resnet, data, tmp_path):
    import compressor as cz
    from compressor.cli import main as cli

    # a loose p99 bound: on a busy machine a tiny model's p99 still fits, so both have a best
    load = cz.LoadTest(levels=(1, 4), max_requests=40, max_seconds=2, max_batch=8, p99_ms=2000)
    result = cz.Pipeline([cz.Int8Quantization(calibration_samples=32)]).run(
        trained_resnet, *data, output_dir=tmp_path, progress=False, threads=1,
        throughput_batch=8, runtimes=["onnxruntime"], load_test=load,
    )  # fmt: skip
    section = json.loads((tmp_path / "report.json").read_text())["load"]
    assert set(section["files"]) == {"baseline", "final"}
    assert section["files"]["final"]["file"] == "model.int8.onnx"
    for role in ("baseline", "final"):
        settings = section["files"][role]["settings"]
        assert [e["label"] for e in settings] == [
            "1x1 threads, no batching",
            "1x1 threads, batch<=8 wait<=2ms",
        ]  # one thread: no split into sessions
        assert all(lv["requests"] == 40 for e in settings for lv in e["levels"])
    assert result.report.load_test == section
    markdown = (tmp_path / "report.md").read_text()
    assert "Under concurrent load" in markdown and "| model.int8.onnx | 1x1 threads" in markdown
    assert "The artifact serves" in markdown
    page = (tmp_path / "report.html").read_text()
    assert 'id="load-chart"' in page and 'id="load"' in page
    assert set(result.report.charts()) == {"accuracy_latency", "per_stage", "load"}
    # compressor export takes the best measured setting from the report beside the file
    final = section["files"]["final"]
    best = next(s for s in final["settings"] if s["label"] == final["best"]["label"])
    artifact, repo = tmp_path / "model.int8.onnx", tmp_path / "repo"
    assert cli(["export", "triton", str(artifact), "--output", str(repo)]) == 0
    config = (repo / "model.int8" / "config.pbtxt").read_text()
    assert f"max_batch_size: {best['max_batch']}\n" in config
    assert f"count: {best['sessions']} kind: KIND_CPU" in config
    # a report.json without the section (older, or no load test) still renders
    document = json.loads((tmp_path / "report.json").read_text())
    del document["load"]
    (tmp_path / "report.json").write_text(json.dumps(document))
    assert cli(["report", str(tmp_path)]) == 0
    assert "Under concurrent load" not in (tmp_path / "report.md").read_text()
    with pytest.raises(cz.UserError, match=r"load_test must be True, False or a cz\.LoadTest"):
        cz.Pipeline([cz.Int8Quantization()]).run(
            trained_resnet, *data, output_dir=tmp_path / "x", load_test="yes"
        )
    with pytest.raises(cz.UserError, match=r"LoadTest max_seconds must be a number > 0"):
        cz.LoadTest(max_seconds=0)


def test_a_server_that_does_not_say_where_the_time_went_still_gets_numbers():
    from compressor.runtime.load import _summarize, level_line

    records = [(2.0 + i / 10, {}) for i in range(20)]  # latency ms, no timing from the server
    level = _summarize(4, records, [], seconds=1.0, sessions=1)
    assert level["throughput"] == 20 and level["latency_ms"]["p50"] == pytest.approx(2.95)
    assert level["mean_batch"] is level["estimate"] is level["run_ms"] is None
    assert "rows/run" not in level_line(level) and "20.0/s" in level_line(level)
    assert "| - |" in to_markdown([{"file": "m", "p99_ms": 50, "best": None,
                                   "settings": [{"label": "HTTP", "levels": [level]}]}])  # fmt: skip


def test_openvino_can_run_behind_the_batcher_and_the_server(two_inputs, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra: pip install 'compressor[openvino]'")
    settings = BatchSettings(max_batch=8, max_wait_ms=10, sessions=2, threads=1, runtime="openvino")
    requests = [_rows(1 + i % 3, seed=i) for i in range(12)]
    with DynamicBatcher(two_inputs, settings) as batcher:
        assert [i.to_dict() for i in batcher.inputs] == [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
        ]
        answers = [f.result(timeout=30) for f in [batcher.submit(r) for r in requests]]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(
            answer.outputs["y"], _direct(two_inputs, request), rtol=1e-5, atol=1e-5
        )
    assert max(a.batch_rows for a in answers) > 3
    assert settings.label == "openvino, 2x1 threads, batch<=8 wait<=10ms"
    with pytest.raises(UserError, match=r"unknown runtime 'tensorrt'; allowed: onnxruntime"):
        BatchSettings(runtime="tensorrt")
    process = subprocess.Popen(
        [sys.executable, "-m", "compressor", "serve", str(two_inputs), "--port", "0",
         "--runtime", "openvino", "--stop-after-requests", "1", "--stop-after-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = process.stdout.readline().split(" at ")[1].split("/v2/")[0]
    with urllib.request.urlopen(url + "/v2/models/two", timeout=30) as response:
        assert json.loads(response.read())["platform"] == "openvino_onnx"
    inputs = _rows(2, 5)
    status, answer = _post(url + "/v2/models/two/infer", *encode_request(inputs, binary=False))
    assert status == 200
    got = np.array(answer["outputs"][0]["data"], np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, _direct(two_inputs, inputs), rtol=1e-5, atol=1e-5)
    assert process.wait(60) == 0
    result = load_file(
        two_inputs,
        settings=[BatchSettings(max_batch=4, max_wait_ms=2, threads=1, runtime="openvino")],
        levels=[4],
        max_requests=40,
    )
    assert result["settings"][0]["levels"][0]["requests"] == 40
    assert result["settings"][0]["runtime"] == "openvino"
