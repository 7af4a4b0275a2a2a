"""The pieces a user's own training loop calls (plan_pruning, SparsityRegularizer, prune,
DistillationLoss, quantize, compare) are the pipeline's own: same zeros, same pruned model."""

import copy
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TinyNoBNNet, TinyResNet
from test_training_stages import context, state_for
from torch.nn import functional as F
from torch.utils.data import DataLoader

import compressor as cz
from compressor.runtime.measure import onnx_predictor, torch_predictor
from compressor.runtime.parity import compare_outputs
from compressor.training.teacher import kd_loss

PRUNE = cz.StructuredPruning(ratio=0.5, round_to=None, bn_recalibration_batches=0)


def ordered(data):
    """The training set in a fixed order (no shuffling), for two runs to see the same."""
    return DataLoader(data[0].dataset, batch_size=32)


def zero_channels(model):
    """Output channels of each conv whose weights are all exactly zero."""
    return {
        n: torch.nonzero(m.weight.flatten(1).abs().sum(1) == 0).flatten().tolist()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    }


@pytest.mark.parametrize("cls", [TinyResNet, TinyNoBNNet], ids=lambda c: c.__name__)
def test_the_regularizer_in_a_users_loop_gives_the_stages_zeros_and_pruned_model(
    cls, data, tmp_path, example
):
    torch.manual_seed(0)
    model = cls().eval()
    loader = ordered(data)
    # the stage, in the library's loop (SGD with Nesterov momentum, cosine decay)
    ctx = context((loader, data[1]), tmp_path, upcoming=(PRUNE,), seed=0)
    stage = cz.SparsityTraining(epochs=1, lr=0.01, optimizer="sgd", alpha=0.0)
    by_stage = stage.apply(state_for(model, example), ctx).model
    # the user's loop with the same optimizer, schedule, data and seed
    torch.manual_seed(0)
    mine = copy.deepcopy(model)
    plan = cz.plan_pruning(mine, example, ratio=0.5, round_to=None, bn_recalibration_batches=0)
    total = len(loader)
    reg = cz.SparsityRegularizer(mine, plan, total_steps=total)
    optimizer = torch.optim.SGD(mine.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
    )
    mine.train()
    for x, y in loader:
        loss = F.cross_entropy(mine(x), y) + reg.penalty()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        reg.step()
    mine.eval()
    assert reg.report()["scheduled_zero_fraction"] == 1.0
    assert zero_channels(mine) == zero_channels(by_stage)
    assert any(zero_channels(mine).values())
    for (name, a), (_, b) in zip(mine.named_parameters(), by_stage.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), name
    # the same pruned model, and the given one untouched
    kept = copy.deepcopy(mine.state_dict())
    pruned = cz.prune(mine, example, plan)
    pruned_by_stage = cz.prune(by_stage, example, plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    assert shapes == {k: v.shape for k, v in pruned_by_stage.state_dict().items()}
    assert all(torch.equal(kept[k], v) for k, v in mine.state_dict().items())
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    x = next(iter(data[1]))[0]
    with torch.no_grad():  # the removed channels were zero: the outputs do not move
        assert torch.allclose(mine(x), pruned(x), atol=1e-4)


def test_plan_numbers_and_targets(example):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    plan = cz.plan_pruning(model, example, target_macs=model and 3_000_000, round_to=None)
    assert plan.macs_after <= 3_000_000 < plan.macs_before
    assert plan.target == ("target_macs", 3_000_000) and 0 < plan.ratio < 1
    assert plan.params_after < plan.params_before and plan.importance == "bn_scale"
    assert "MACs" in repr(plan) and plan.summary()["macs_after"] == plan.macs_after
    pruned = cz.prune(model, example, plan)
    assert cz.pruning_sensitivity is not None and pruned is not model
    from compressor.runtime.measure import count_params_macs

    assert count_params_macs(pruned, example)[1] <= 3_000_000


def test_bad_calls_name_what_is_wrong_and_what_is_allowed(example, data, tmp_path):
    model = TinyResNet().eval()
    plan = cz.plan_pruning(model, example, ratio=0.5)
    with pytest.raises(cz.ModelError, match=r"made for another model.*stem"):
        cz.SparsityRegularizer(TinyNoBNNet(), plan, total_steps=4)
    with pytest.raises(cz.ModelError, match=r"made for another model"):
        cz.prune(TinyNoBNNet(), example, plan)
    reg = cz.SparsityRegularizer(model, plan, total_steps=1)
    reg.step()
    with pytest.raises(cz.UserError, match=r"stepped 2 times, past its total_steps=1"):
        reg.step()
    with pytest.raises(cz.UserError, match=r"total_steps must be an integer >= 1"):
        cz.SparsityRegularizer(model, plan, total_steps=0)
    with pytest.raises(cz.UserError, match=r"target_size_mb is measured.*allowed here: ratio"):
        cz.plan_pruning(model, example, target_size_mb=1.0)
    with pytest.raises(
        cz.RecipeError,
        match=r"unknown option .round_two. for stage .structured_pruning. \(allowed: ratio",
    ):
        cz.plan_pruning(model, example, round_two=3)
    with pytest.raises(
        cz.UserError, match=r"DistillationLoss.alpha must be a number in \[0.0, 1.0\] \(got: 2.0\)"
    ):
        cz.DistillationLoss(model, alpha=2.0)
    wrong = DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 5, 16, 16), torch.zeros(8).long())
    )
    with pytest.raises(cz.DataError, match=r"calibration_data.*5, 16, 16"):
        cz.quantize(model, wrong, tmp_path / "m.int8.onnx")
    with pytest.raises(cz.RecipeError, match=r"int8_quantization.method must be one of"):
        cz.quantize(model, data[0], tmp_path / "m.int8.onnx", method="best")
    with pytest.raises(cz.UserError, match=r"entry 'x' must be a torch.nn.Module or an ONNX file"):
        cz.compare({"x": 3}, data[1])
    assert not (tmp_path / "m.int8.onnx").exists()


def test_distillation_loss_reads_outputs_as_the_stage_does(trained_resnet):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    student = TinyResNet().eval()
    kd = cz.DistillationLoss(trained_resnet, temperature=3.0, alpha=0.6)
    with torch.no_grad():
        want = kd_loss(
            student(x), trained_resnet(x), y, temperature=3.0, alpha=0.6, hard_loss=F.cross_entropy
        )
        assert torch.allclose(kd(student(x), x, y), want)
        # dict outputs and the teacher's outputs given instead of the inputs
        given = kd({"logits": student(x)}, targets=y, teacher_outputs=(trained_resnet(x),))
        assert torch.allclose(given, want)
    assert not list(kd.parameters())  # the teacher is not trained through the loss
    assert all(p.requires_grad for p in trained_resnet.parameters())  # nor changed


def test_quantize_writes_an_int8_file_that_agrees_with_the_model(trained_resnet, data, tmp_path):
    path = cz.quantize(trained_resnet, data[0], tmp_path / "out" / "tiny.int8.onnx")
    assert path == tmp_path / "out" / "tiny.int8.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert "QuantizeLinear" in ops or "DynamicQuantizeLinear" in ops
    x = next(iter(data[1]))[0]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = trained_resnet(x).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert np.abs(got - want).max() < 0.5 * np.abs(want).max()
    report = cz.compare(
        {"baseline": trained_resnet, "int8": path}, data[1], output_dir=tmp_path / "cmp"
    )
    rows = [(r.name, r.runtime) for r in report.rows]
    assert rows[0] == ("baseline", "torch") and rows[-1] == ("int8", "onnxruntime")
    assert report.rows[-1].precision == "int8"
    assert report.parity["reference"] == "baseline" and report.parity["artifact"] == "int8"
    # the parity from both evaluations' outputs equals comparing the two again
    again = compare_outputs(
        torch_predictor(trained_resnet), onnx_predictor(path, 1), cz.DataSpec(data[1])
    )
    for key in ("top1_agreement", "max_abs_diff", "mean_abs_diff", "samples"):
        assert report.parity[key] == pytest.approx(again[key], abs=1e-5)
    saved = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [r["name"] for r in saved["rows"]][-1] == "int8"
    assert (tmp_path / "cmp" / "report.html").is_file()
    assert abs(report.rows[-1].accuracy - report.rows[0].accuracy) < 0.1
