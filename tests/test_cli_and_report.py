import json
import subprocess
import sys

import pytest

from compressor.cli import main
from compressor.report.report import Report, Row

TINY_RECIPE = """stages:
  - structured_pruning: {ratio: 0.5}
  - distillation: {epochs: 1}
  - int8_quantization: {calibration_samples: 64}
"""


def test_compress_runs_the_demo_pipeline(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    argv = [
        "compress",
        "--recipe",
        str(recipe),
        "--output",
        str(out),
        "--baseline-epochs",
        "1",
        "--limit-train-batches",
        "3",
        "--quiet",
        "--threads",
        "1",
        "--runtime",  # OpenVINO's rows have tests of their own
        "onnxruntime",
    ]
    assert main(argv) == 0
    assert {"model.onnx", "model.int8.onnx", "report.json", "report.md", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    printed = capsys.readouterr().out
    assert "| int8_quantization | onnxruntime | int8 |" in printed
    # a second run into the same folder needs --overwrite, and keeps the user's own files
    (out / "notes.txt").write_text("mine")
    assert main(["compress", "--recipe", str(recipe), "--output", str(out), "--quiet"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    # --resume finds every stage finished: nothing is trained or measured again
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["rows"] == rows
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "--recipe", "missing.yaml"], "cannot read recipe"),
        (["compress", "--threads", "0"], "--threads must be >= 1 (got: 0)"),
        (["compress", "--device", "tpu", "--recipe", "{recipe}"], "unknown device 'tpu'"),
        (["compress", "--recipe", "{bad_stage}"], "unknown stage 'prune'"),
        (
            ["compress", "--recipe", "{bad_option}"],
            "structured_pruning.ratio must be a number in (0.0, 1.0) (got: 2)",
        ),
        (["compress", "--output", "{file}"], "is a file; give a folder"),
        (["compress", "--resume", "--overwrite"], "--resume continues the run in --output"),
    ],
    ids=[
        "missing-recipe",
        "bad-threads",
        "bad-device",
        "unknown-stage",
        "bad-option",
        "output-is-file",
        "resume-and-overwrite",
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(argv, message, tmp_path, capsys):
    files = {
        "recipe": tmp_path / "ok.yaml",
        "bad_stage": tmp_path / "stage.yaml",
        "bad_option": tmp_path / "option.yaml",
        "file": tmp_path / "a-file",
    }
    files["recipe"].write_text(TINY_RECIPE)
    files["bad_stage"].write_text("stages:\n  - prune: {ratio: 0.5}\n")
    files["bad_option"].write_text("stages:\n  - structured_pruning: {ratio: 2}\n")
    files["file"].write_text("x")
    argv = [a.format(**files) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert main([*argv, "--quiet", "--baseline-epochs", "1", "--limit-train-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_python_dash_m_help_runs():
    done = subprocess.run(
        [sys.executable, "-m", "compressor", "compress", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    assert "--recipe" in done.stdout and "examples:" in done.stdout


def row(name, runtime, precision, acc, size, p50):
    return Row(
        name,
        runtime,
        precision,
        acc,
        1000,
        2000,
        size,
        {"batch_size": 1, "p50": p50, "p95": p50 * 1.1},
        {"batch_size": 32, "samples_per_s": 1000 / p50},
    )


def test_report_summary_and_round_trip(tmp_path):
    report = Report(
        rows=[
            row("baseline", "torch", "fp32", 0.90, 4000, 8.0),
            row("baseline", "onnxruntime", "fp32", 0.90, 4100, 4.0),
            row("int8_quantization", "onnxruntime", "int8", 0.89, 1025, 1.0),
        ],
        environment={"cpu": "test", "threads": 2, "torch": "x", "onnxruntime": "y"},
    )
    assert report.summary == {
        "final": "int8_quantization",
        "speedup_vs_torch": 8.0,
        "speedup_vs_onnx": 4.0,
        "size_ratio": 4.0,
        "accuracy_drop": pytest.approx(0.01),
        "runtimes": {"onnxruntime": {"p50_ms": 1.0, "speedup_vs_fp32": 4.0, "accuracy": 0.89}},
        "fastest_runtime": "onnxruntime",
        "fastest_fp32_runtime": "onnxruntime",
        "speedup_vs_fastest_fp32": 4.0,
    }
    report.save(tmp_path)
    loaded = Report.load(tmp_path / "report.json")
    assert loaded.rows == report.rows
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == 1
    md = (tmp_path / "report.md").read_text()
    assert md == str(report)
    assert "8.00x faster than eager torch FP32" in md and "4.00x smaller" in md
