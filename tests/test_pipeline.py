import copy
import json
from dataclasses import dataclass

import pytest
import torch
from conftest import TinyNoBNNet, TinyResNet, fit
from torch import nn
from torch.nn import functional as F

import compressor as cz
from compressor.models.checkpoints import load_checkpoint
from compressor.stage import Stage

ROW_KEYS = {
    "name",
    "runtime",
    "precision",
    "accuracy",
    "params",
    "macs",
    "size_bytes",
    "latency_ms",
    "throughput",
}


def four_stages() -> cz.Pipeline:
    return cz.Pipeline([
        cz.SparsityTraining(epochs=1, l1=1e-3),
        cz.StructuredPruning(ratio=0.5, round_to=8),
        cz.Distillation(epochs=2, lr=0.005),  # 0.01+ throws the Adam-trained no-BN net off
        cz.Int8Quantization(calibration_samples=64),
    ])  # fmt: skip


@pytest.mark.parametrize(
    "cls", [TinyResNet, TinyNoBNNet], ids=["bn-residual", "no-bn-flatten-head"]
)
def test_all_four_stages_end_to_end(cls, data, tmp_path):
    torch.manual_seed(0)
    model = fit(cls(), data[0])
    before = copy.deepcopy(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    result = four_stages().run(
        model,
        *data,
        output_dir=tmp_path,
        progress=False,
        threads=1,
        throughput_batch=8,
        runtimes=["onnxruntime"],  # tests/test_runtimes.py adds OpenVINO's rows
    )

    # the user's model is untouched
    assert [id(p) for p in model.parameters()] == params_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training

    # the output folder contract
    assert result.onnx_path == tmp_path / "model.int8.onnx"
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "report.json", "report.md", "report.html"} <= names
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 4

    # report.json schema
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema_version"] == 1
    assert {"torch", "onnxruntime", "cpu", "threads"} <= set(report["environment"])
    rows = report["rows"]
    assert [(r["name"], r["runtime"], r["precision"]) for r in rows] == [
        ("baseline", "torch", "fp32"), ("baseline", "onnxruntime", "fp32"),
        ("sparsity_training", "torch", "fp32"), ("structured_pruning", "torch", "fp32"),
        ("distillation", "torch", "fp32"), ("int8_quantization", "onnxruntime", "int8"),
    ]  # fmt: skip
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["latency_ms"]["batch_size"] == 1 and row["latency_ms"]["p50"] > 0
        assert row["throughput"]["batch_size"] == 8 and row["throughput"]["samples_per_s"] > 0
        assert row["seconds"]["measure"] > 0
    # wall time of every stage (the torch baseline row is only measured)
    assert [sorted(r["seconds"]) for r in rows] == [["measure"]] + [["measure", "stage"]] * 5
    steps = rows[5]["details"]["quantization"]["seconds"]
    assert list(steps) == ["export", "pre_process", "calibrate_quantize", "placement", "check"]
    assert sum(steps.values()) <= rows[5]["seconds"]["stage"] + 0.05
    assert rows[3]["params"] < 0.5 * rows[0]["params"]
    assert rows[3]["macs"] < 0.5 * rows[0]["macs"]
    assert rows[5]["size_bytes"] == (tmp_path / "model.int8.onnx").stat().st_size
    assert rows[1]["size_bytes"] == (tmp_path / "model.onnx").stat().st_size
    s = report["summary"]
    assert s["size_ratio"] == pytest.approx(rows[1]["size_bytes"] / rows[5]["size_bytes"], rel=1e-3)
    assert s["accuracy_drop"] == pytest.approx(rows[0]["accuracy"] - rows[5]["accuracy"], abs=1e-6)
    assert s["size_ratio"] > 4
    assert rows[5]["accuracy"] > 0.5  # still learned something after all four stages
    assert "| int8_quantization | onnxruntime | int8 |" in (tmp_path / "report.md").read_text()
    assert isinstance(result.model, nn.Module)


def test_checkpoints_rebuild_the_pruned_model(trained_resnet, data, tmp_path):
    pipeline = cz.Pipeline([cz.StructuredPruning(ratio=0.5, round_to=None)])
    result = pipeline.run(
        trained_resnet, data[0], data[1], output_dir=tmp_path, progress=False, threads=1
    )
    rebuilt, payload = load_checkpoint(
        tmp_path / "checkpoints" / "01_structured_pruning.pt", trained_resnet
    )
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(rebuilt.eval()(x), result.model.eval()(x))
    assert payload["stage"] == {"structured_pruning": pipeline.stages[0].to_dict()}
    assert [r["name"] for r in payload["extra"]["rows"]][-1] == "structured_pruning"
    assert trained_resnet.conv1.out_channels == 32  # the template was copied, not changed


@dataclass(frozen=True)
class Interrupted(Stage):
    """Stands for a crash or Ctrl-C in the middle of a run."""

    name = "interrupted"

    def apply(self, state, ctx):
        raise KeyboardInterrupt


def _not_again(self, state, ctx):
    raise AssertionError(f"{self.name} ran again")


def test_resume_continues_after_the_last_finished_stage(
    trained_resnet, data, tmp_path, monkeypatch
):
    prune, distill = cz.StructuredPruning(ratio=0.5, round_to=8), cz.Distillation(epochs=1)
    run = {"output_dir": tmp_path, "progress": False, "threads": 1, "throughput_batch": 8}
    with pytest.raises(KeyboardInterrupt):
        cz.Pipeline([prune, distill, Interrupted()]).run(trained_resnet, *data, **run)
    # an unfinished run keeps its checkpoints in the staging folder, and publishes nothing
    assert not (tmp_path / "model.onnx").exists()
    finished = tmp_path / ".compressor-run" / "checkpoints" / "02_distillation.pt"
    distilled, _ = load_checkpoint(finished, trained_resnet)

    full = cz.Pipeline([prune, distill, cz.Int8Quantization(calibration_samples=32)])
    with monkeypatch.context() as m:  # the finished stages must not run again
        m.setattr(cz.StructuredPruning, "apply", _not_again)
        m.setattr(cz.Distillation, "apply", _not_again)
        result = full.run(trained_resnet, *data, resume=True, **run)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(result.model(x), distilled(x))
    names = [r.name for r in result.report.rows if r.runtime != "openvino"]
    assert names == [
        "baseline",
        "baseline",
        "structured_pruning",
        "distillation",
        "int8_quantization",
    ]
    assert result.onnx_path == tmp_path / "model.int8.onnx"
    assert json.loads((tmp_path / "report.json").read_text())["rows"][-1]["precision"] == "int8"
    assert not (tmp_path / ".compressor-run").exists()
    assert (tmp_path / "checkpoints" / "02_distillation.pt").is_file()

    # changed options run again from that stage on; the stages before it do not
    again = cz.Pipeline([prune, cz.Distillation(epochs=1, lr=0.05)])
    with monkeypatch.context() as m:
        m.setattr(cz.StructuredPruning, "apply", _not_again)
        result = again.run(trained_resnet, *data, resume=True, **run)
    assert not torch.equal(result.model(x), distilled(x))
    assert not (tmp_path / "model.int8.onnx").exists()  # the new result has no INT8 file
    assert not (tmp_path / "checkpoints" / "03_int8_quantization.pt").exists()


def test_resume_refuses_another_model_or_other_settings(trained_resnet, data, tmp_path):
    run = {"output_dir": tmp_path, "progress": False, "throughput_batch": 8}
    pipeline = cz.Pipeline([cz.StructuredPruning(ratio=0.5, round_to=8)])
    pipeline.run(trained_resnet, *data, threads=1, **run)
    other = copy.deepcopy(trained_resnet)
    with torch.no_grad():
        other.fc.bias += 1
    with pytest.raises(cz.UserError, match="another model"):
        pipeline.run(other, *data, threads=1, resume=True, **run)
    with pytest.raises(cz.UserError, match="threads was 1, now 2"):
        pipeline.run(trained_resnet, *data, threads=2, resume=True, **run)


def test_custom_loss_and_metric_are_used(trained_resnet, data, tmp_path):
    calls = {"loss": 0, "eval": 0}

    def loss_fn(outputs, targets):
        calls["loss"] += 1
        return F.cross_entropy(outputs, targets, label_smoothing=0.1)

    def eval_fn(predict, batches):
        calls["eval"] += 1
        return 0.25

    pipeline = cz.Pipeline([cz.Distillation(epochs=1)])
    result = pipeline.run(
        trained_resnet,
        data[0],
        data[1],
        output_dir=tmp_path,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        progress=False,
        threads=1,
        runtimes=["onnxruntime"],
    )
    rows = result.report.rows
    # once per distinct model: the baseline in ONNX Runtime (torch takes it), distillation
    assert calls["loss"] == 8 and calls["eval"] == 2
    assert [r.details.get("accuracy_from", {}).get("runtime") for r in rows] == [
        "onnxruntime",
        None,
        None,
    ]
    assert all(r.accuracy == 0.25 for r in rows)

    calls["eval"] = 0
    pipeline.run(
        trained_resnet,
        data[0],
        data[1],
        output_dir=tmp_path / "full",
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        progress=False,
        threads=1,
        runtimes=["onnxruntime"],
        full_evaluation=True,
    )
    assert calls["eval"] == 3  # one per row


def test_dataspec_with_custom_batches(trained_resnet, data, tmp_path):
    dict_batches = [{"image": x, "label": y} for x, y in data[0]]
    spec = cz.DataSpec(dict_batches, input_fn=lambda b: b["image"], target_fn=lambda b: b["label"])
    result = cz.Pipeline([cz.StructuredPruning(ratio=0.25, round_to=None)]).run(
        trained_resnet, spec, spec, output_dir=tmp_path, progress=False, threads=1
    )
    assert result.report.rows[-1].name == "structured_pruning"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "resnet"}, cz.UserError, "model must be a torch.nn.Module"),
        ({"train_data": []}, cz.DataError, "the data set is empty"),
        ({"train_data": 5}, cz.DataError, "train_data must be an iterable of batches"),
        ({"device": "tpu"}, cz.UserError, "unknown device 'tpu'"),
        (
            {"train_data": [(torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))]},
            cz.ModelError,
            r"failed in layer 'stem.0' \(Conv2d\)",
        ),
    ],
    ids=["not-a-module", "empty-data", "not-iterable", "bad-device", "wrong-channels"],
)
def test_bad_inputs_fail_before_any_work(kwargs, error, match, trained_resnet, data, tmp_path):
    args = {"model": trained_resnet, "train_data": data[0], "eval_data": data[1]}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        four_stages().run(
            args.pop("model"),
            args.pop("train_data"),
            args.pop("eval_data"),
            output_dir=tmp_path / "out",
            progress=False,
            **args,
        )
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_evaluation_joins_small_batches_without_changing_the_numbers(trained_resnet, data):
    """The library's metrics evaluate in batches of at least EVAL_ROWS: one-sample batches
    are joined (the same samples, in order, same accuracy); a change of shape (another
    sequence length) starts a new batch; per-image target lists are left as they are."""
    from compressor.data import EVAL_ROWS, grouped
    from compressor.runtime.measure import top1, torch_predictor

    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in data[1] for i in range(len(x))]
    spec = cz.DataSpec(singles)
    joined = grouped(spec)
    sizes = [len(x) for x, _ in joined]
    assert sum(sizes) == len(singles) and max(sizes) == min(EVAL_ROWS, len(singles))
    assert torch.equal(torch.cat([y for _, y in joined]), torch.cat([y for _, y in singles]))
    predict = torch_predictor(trained_resnet)
    assert top1(predict, joined) == top1(predict, spec)

    text = [({"ids": torch.ones(1, n, dtype=torch.long)}, torch.zeros(1)) for n in (3, 3, 5)]
    assert [x["ids"].shape for x, _ in grouped(cz.DataSpec(text))] == [(2, 3), (1, 5)]
    boxes = cz.DataSpec([(torch.zeros(1, 3, 8, 8), [{"boxes": torch.zeros(0, 4)}])] * 3)
    assert grouped(boxes) is boxes
