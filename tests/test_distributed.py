"""Data-parallel runs under real torchrun processes (gloo on the loopback), and the training
options that come with them: mixed precision and gradient accumulation."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyNoBNNet, synthetic_classification, write_image_folder
from torch.utils.data import DataLoader

import compressor as cz
from compressor.data import DataSpec
from compressor.errors import UserError
from compressor.runtime.measure import top1
from compressor.stage import RunContext
from compressor.training.distributed import _DealtOut
from compressor.training.loop import train

HERE = Path(__file__).parent
RUN = HERE / "ranks_run.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun`` with ``ranks`` processes on this machine, rendezvous on the loopback."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        *args,
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent
    )


def _ranks(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("rank-*.json"))]


def test_two_ranks_train_together_and_rank_zero_alone_writes(tmp_path):
    done = torchrun(str(RUN), str(tmp_path / "out"), str(tmp_path / "ranks"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path / "ranks")
    assert len(ranks) == 2
    # every rank returns the same pruned structure and weights (rank 0's result) ...
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["output_dir"] == ranks[1]["output_dir"] == str(tmp_path / "out")
    # ... and their own training, before rank 0 went on, had the same weights on each rank
    for step in ("sparsity_training", "distillation"):
        assert ranks[0]["ranks"][step] == {"world_size": 2, "in_sync": True}
    assert ranks[0]["ranks"]["structured_pruning"] is None  # rank 0 alone
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][-1]["precision"] == "int8"
    assert not list(tmp_path.glob("**/compressor-rank-*"))
    # the same run in one process: accuracy close (each rank saw half of every epoch)
    alone = subprocess.run(
        [sys.executable, str(RUN), str(tmp_path / "alone"), str(tmp_path / "alone-ranks")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    (one,) = _ranks(tmp_path / "alone-ranks")
    assert one["ranks"]["distillation"] is None
    assert abs(ranks[0]["int8_top1"] - one["int8_top1"]) <= 0.05
    assert ranks[0]["int8_top1"] > 0.8


def test_latency_aware_ranks_plan_from_rank_zeros_table(tmp_path):
    done = torchrun(str(RUN), str(tmp_path / "out"), str(tmp_path / "ranks"), "--latency-aware")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path / "ranks")
    assert ranks[0]["allocation"] == "latency"
    assert ranks[0]["scheduled"] and ranks[0]["ranks"]["sparsity_training"]["in_sync"]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    # the layer timings each rank planned sparsity training from are rank 0's, to the bit
    assert ranks[0]["timings"] and ranks[0]["timings"] == ranks[1]["timings"]


def test_a_rank_whose_data_fails_stops_every_rank(tmp_path):
    done = torchrun(
        str(RUN), str(tmp_path / "out"), str(tmp_path / "ranks"), "--fail-rank", "1", timeout=180
    )
    assert done.returncode != 0
    assert "rank 1: its data failed" in done.stderr
    assert not (tmp_path / "out" / "report.json").exists()
    assert not list((tmp_path / "ranks").glob("*.json"))


def test_rank_zero_failing_alone_stops_the_others_with_its_message(tmp_path):
    done = torchrun(
        str(RUN), str(tmp_path / "out"), str(tmp_path / "ranks"), "--fail-after-pruning"
    )
    assert done.returncode != 0
    assert "[rank0]: compressor.errors.UserError: this stage fails on rank 0" in done.stderr
    assert "DistributedError: rank 0 failed: this stage fails on rank 0" in done.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_the_cli_under_torchrun_prints_and_writes_once(tmp_path):
    images = write_image_folder(tmp_path / "images", size=16, train=16, val=8)
    done = torchrun(
        "-m", "compressor", "compress",
        "--model", f"{HERE / 'user_models.py'}:build",
        "--data", f"imagefolder:{images}", "--input-size", "16", "--batch-size", "8",
        "--output", str(tmp_path / "out"), "--baseline-epochs", "1",
        "--set", "sparsity_training.epochs=1", "--set", "distillation.epochs=1",
        "--calibration-samples", "32", "--runtime", "onnxruntime", "--threads", "1",
        "--throughput-batch", "8",
        "--mixed-precision", "bf16", "--accumulate-grad-batches", "2", "--json",
        "--target-params", "4K",
        "--set", "int8_quantization.qat=always",  # rank 0 alone trains the INT8 file
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)  # one report: rank 1 printed nothing
    assert document["output_dir"] == str(tmp_path / "out")
    assert done.stderr.count("stage 4/4: int8_quantization") == 1
    assert "(2 ranks)" in done.stderr
    steps = {r["name"]: r["details"].get("data_parallel") for r in document["rows"]}
    assert steps["distillation"] == {"world_size": 2, "in_sync": True}
    # rank 0 alone searched the target's ratio; sparsity on both ranks aimed at it
    rows = {r["name"]: r["details"] for r in document["rows"]}
    target = rows["structured_pruning"]["pruning"]["target"]
    aimed = rows["sparsity_training"]["sparsity"]["target"]["ratio"]
    assert target["met"] and target["ratio"] == pytest.approx(aimed, abs=1e-4)
    assert rows["sparsity_training"]["data_parallel"] == {"world_size": 2, "in_sync": True}
    qat = rows["int8_quantization"]["quantization"]["qat"]
    assert qat["epochs"] == 1 and len(qat["train_loss"]) == 1 and qat["kept"] in ("qat", "ptq")


def test_dealt_out_batches_cover_the_data_once():
    batches = list(range(7))
    shares = [list(_DealtOut(batches, r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(_DealtOut(batches, r, 3)) for r in range(3)] == [3, 2, 2]


def _train(model, batch_size: int, accumulate: int = 1, mixed: str | None = None, epochs=1):
    """``model`` trained in place by `train` on unshuffled synthetic data; its CPU context."""
    loader = DataLoader(synthetic_classification(64, seed=0), batch_size=batch_size)
    ctx = RunContext(
        train_data=DataSpec(loader),
        eval_data=DataSpec(loader),
        output_dir=Path("."),
        loss_fn=torch.nn.functional.cross_entropy,
        eval_fn=top1,
        device=torch.device("cpu"),
        progress=False,
        mixed_precision=mixed,
        accumulate_grad_batches=accumulate,
    )
    history = train(
        model,
        ctx,
        epochs=epochs,
        lr=0.05,
        compute_loss=lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y),
        desc="test",
    )
    return history


def test_accumulating_two_batches_is_one_step_on_both():
    # no BatchNorm and a mean loss: two half batches add up to the whole batch's gradient
    torch.manual_seed(0)
    start = TinyNoBNNet()
    whole, halves = copy.deepcopy(start), copy.deepcopy(start)
    _train(whole, 32)
    _train(halves, 16, accumulate=2)
    moved = 0
    for a, b, c in zip(whole.parameters(), halves.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(a, c))
    assert moved == len(list(start.parameters()))


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(mixed):
    val = DataSpec(DataLoader(synthetic_classification(128, seed=1), batch_size=32))
    accuracy, weights = {}, {}
    for precision in (None, mixed):
        torch.manual_seed(0)
        model = TinyNoBNNet()
        history = _train(model, 16, mixed=precision, epochs=4)
        assert history[-1] < history[0]
        with torch.no_grad():
            accuracy[precision] = top1(model, val)
        weights[precision] = model.classifier[-1].weight
    assert not torch.equal(weights[None], weights[mixed])  # autocast was on
    assert accuracy[None] > 0.5
    assert accuracy[mixed] >= accuracy[None] - 0.1


def test_bad_training_options_are_named(data, trained_resnet, tmp_path):
    pipeline = cz.Pipeline([cz.Distillation(epochs=1)])
    with pytest.raises(UserError, match=r"unknown mixed_precision 'fp8' \(allowed: None, 'bf16'"):
        pipeline.run(trained_resnet, *data, output_dir=tmp_path, mixed_precision="fp8")
    with pytest.raises(
        UserError, match=r"accumulate_grad_batches must be an integer >= 1 \(got: 0"
    ):
        pipeline.run(trained_resnet, *data, output_dir=tmp_path, accumulate_grad_batches=0)
    assert not list(tmp_path.iterdir())
