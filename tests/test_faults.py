"""Faults and bad input: the output folder, resume, full disks, interrupts, clear errors.

Real processes, real signals and a real file-size limit; nothing is patched.
"""

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compressor as cz
from compressor.models.checkpoints import load_checkpoint, save_checkpoint

HERE = Path(__file__).parent
RUN = {"progress": False, "threads": 1, "throughput_batch": 8}
PRUNE = cz.StructuredPruning(ratio=0.5, round_to=8)


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, *args], env=env, **kwargs)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_runs_lock_is_not(
    trained_resnet, data, tmp_path
):
    holder = _python(
        "-c",
        "import sys, time; from compressor.pipeline.output_folder import run_folder\n"
        "with run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
        str(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            cz.UserError, match=rf"in use by another compressor run \(pid {holder.pid} "
        ):
            cz.Pipeline([PRUNE]).run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    finally:
        holder.kill()
        holder.wait()
    # the process died holding the lock: the next run goes ahead
    cz.Pipeline([PRUNE]).run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    assert (tmp_path / "report.json").is_file()


def test_a_failed_overwrite_keeps_the_earlier_result(trained_resnet, data, tmp_path):
    cz.Pipeline([PRUNE, cz.Int8Quantization(calibration_samples=32)]).run(
        trained_resnet, *data, output_dir=tmp_path, **RUN
    )
    before = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != ".compressor.lock"
    }
    failing = cz.Pipeline([cz.StructuredPruning(ratio=0.5, round_to=100_000)])
    with pytest.raises(cz.RecipeError, match="removes no channel"):
        failing.run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    after = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != ".compressor.lock" and ".compressor-run" not in p.parts
    }
    assert after == before


def test_artifacts_get_the_umask_mode_not_0600(trained_resnet, data, tmp_path):
    cz.Pipeline([PRUNE]).run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("model.onnx", "report.json", "checkpoints/01_structured_pruning.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_full_disk_while_writing_a_checkpoint_is_one_clear_error(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail as a full disk would."""
    good = tmp_path / "c.pt"
    save_checkpoint(good, nn.Linear(4, 4), step="s", stage={}, extra={})
    script = (
        "import resource, signal, sys, torch\n"
        "from torch import nn\n"
        "from compressor.models.checkpoints import save_checkpoint\n"
        "from compressor.errors import UserError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    save_checkpoint(sys.argv[1], nn.Linear(1000, 1000), step='s', stage={}, extra={})\n"
        "except UserError as exc:\n"
        "    print(exc); sys.exit(2)\n"
    )
    done = _python("-c", script, str(good), stdout=subprocess.PIPE, text=True)
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 2, out
    assert "the disk may be full or a size limit reached" in out and str(good) in out
    model, _ = load_checkpoint(good, nn.Linear(4, 4))  # the last good one, intact
    assert model.weight.shape == (4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The output folder of the fault run, uninterrupted (one for every signal)."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert _python(str(HERE / "fault_run.py"), str(out)).wait(timeout=600) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_resumed_gives_the_same_artifact_bytes(whole, tmp_path, sig):
    cut = tmp_path / "cut"
    run = _python(str(HERE / "fault_run.py"), str(cut), "--slow-stage", "60")
    _wait_for(cut / ".compressor-run" / "checkpoints" / "02_structured_pruning.pt", run)
    run.send_signal(sig)
    status = run.wait(timeout=120)
    assert status == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert not (cut / "model.int8.onnx").exists()
    resumed = _python(str(HERE / "fault_run.py"), str(cut), "--resume")
    assert resumed.wait(timeout=600) == 0
    assert (cut / "model.int8.onnx").read_bytes() == (whole / "model.int8.onnx").read_bytes()
    for name in ("03_sleep.pt", "04_distillation.pt"):
        a = torch.load(whole / "checkpoints" / name, weights_only=True)["state_dict"]
        b = torch.load(cut / "checkpoints" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_over_a_truncated_checkpoint_runs_that_stage_again(trained_resnet, data, tmp_path):
    pipeline = cz.Pipeline([PRUNE, cz.Distillation(epochs=1)])
    first = pipeline.run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    checkpoint = tmp_path / "checkpoints" / "02_distillation.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    again = pipeline.run(trained_resnet, *data, output_dir=tmp_path, resume=True, **RUN)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again.model(x), first.model(x))  # rerun from the seed: the same
    assert load_checkpoint(checkpoint, trained_resnet)[0] is not None


def test_resume_with_another_seed_names_the_seed(trained_resnet, data, tmp_path):
    cz.Pipeline([PRUNE]).run(trained_resnet, *data, output_dir=tmp_path, **RUN)
    with pytest.raises(cz.UserError, match="seed was 0, now 1"):
        cz.Pipeline([PRUNE]).run(
            trained_resnet, *data, output_dir=tmp_path, resume=True, seed=1, **RUN
        )


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 4)

    def forward(self, x):
        return {"boxes": [self.fc(self.conv(x).mean((2, 3)))]}  # no tensor to compare


def _nan(model):
    model = copy.deepcopy(model)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    return model


BAD_CALLS = {
    "dict output": (lambda m, d: (DictNet(), *d), {}, cz.ModelError, "cannot find the output tensor"),
    "nan weights": (lambda m, d: (_nan(m), *d), {}, cz.ModelError, "NaN or infinite"),
    "empty eval": (lambda m, d: (m, d[0], []), {}, cz.DataError, "eval_data is empty"),
    "targets": (
        lambda m, d: (m, DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.full((8,), 7))), d[1]),
        {},
        cz.DataError,
        "train_data has class 7, but the model has 4 outputs",
    ),
    "threads -1": (lambda m, d: (m, *d), {"threads": -1}, cz.UserError, "threads must be"),
    "threads 0": (lambda m, d: (m, *d), {"threads": 0}, cz.UserError, "threads must be"),
    "output_dir None": (lambda m, d: (m, *d), {"output_dir": None}, cz.UserError, "output_dir"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_python_input_is_one_clear_user_error(case, trained_resnet, data, tmp_path):
    build, extra, error, match = BAD_CALLS[case]
    run = {**RUN, "output_dir": tmp_path, **extra}
    with pytest.raises(error, match=match):
        cz.Pipeline([PRUNE]).run(*build(trained_resnet, data), **run)


def test_a_ratio_that_removes_less_than_asked_says_why(trained_resnet, data, tmp_path):
    with pytest.warns(UserWarning, match=r"removed \d+% of the prunable channels where ratio"):
        result = cz.Pipeline([cz.StructuredPruning(ratio=0.9, round_to=16)]).run(
            trained_resnet, *data, output_dir=tmp_path, **RUN
        )
    notes = result.report.rows[-1].details["notes"]
    assert any("stopped at round_to=16 channels" in n for n in notes)


def test_corrupt_images_are_named_before_training(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / label / f"{i}.jpg")
    bad = tmp_path / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:-40])
    from compressor.sources.data_specs import DataOptions, load_data

    with pytest.raises(cz.DataError, match=re.escape(f"image '{bad}' cannot be read")):
        load_data(f"imagefolder:{tmp_path}", DataOptions(input_size=8, val_split=0.25))


def test_a_weights_file_that_is_not_a_checkpoint_says_so(tmp_path):
    from compressor.sources.model_specs import load_model

    text = tmp_path / "w.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(cz.UserError, match=r"is not a file torch\.save wrote"):
        load_model("torchvision:resnet18", num_classes=4, weights=text)
    cut = tmp_path / "cut.pt"
    torch.save(nn.Linear(64, 64).state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(cz.UserError, match=r"not a file torch\.save wrote, or it is truncated"):
        load_model("torchvision:resnet18", num_classes=4, weights=cut)
