import copy
from pathlib import Path

import pytest
import torch
from conftest import TinyNoBNNet, TinyResNet
from torch.nn import functional as F

import compressor as cz
from compressor.runtime.measure import top1
from compressor.stage import RunContext, State
from compressor.training.loop import optimizer_for, probe_optimizer
from compressor.training.teacher import kd_loss, teacher_loss


def context(data, tmp_path: Path, **kw) -> RunContext:
    return RunContext(
        train_data=cz.DataSpec(data[0]), eval_data=cz.DataSpec(data[1]), output_dir=tmp_path,
        loss_fn=F.cross_entropy, eval_fn=top1, device=torch.device("cpu"), progress=False,
        step="test", **kw,
    )  # fmt: skip


def state_for(model, example) -> State:
    return State(
        model=copy.deepcopy(model),
        teacher=copy.deepcopy(model).requires_grad_(False),
        example_input=example,
    )


@pytest.mark.parametrize("cls", [TinyResNet, TinyNoBNNet], ids=lambda c: c.__name__)
def test_l1_penalty_shrinks_channel_scales(cls, data, tmp_path, example):
    torch.manual_seed(0)
    model = cls()
    ctx = context(data, tmp_path)
    plain = cz.SparsityTraining(epochs=2, l1=0.0, lr=0.01).apply(state_for(model, example), ctx)
    sparse = cz.SparsityTraining(epochs=2, l1=0.5, lr=0.01).apply(state_for(model, example), ctx)
    s_plain, s_sparse = plain.details["sparsity"], sparse.details["sparsity"]
    assert s_sparse["penalty_on"] == ("batchnorm_scale" if cls is TinyResNet else "channel_l2_norm")
    assert s_sparse["mean_scale"] < 0.9 * s_plain["mean_scale"]
    assert 0.0 <= s_sparse["near_zero_fraction"] <= 1.0


def test_kd_loss_matches_its_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, alpha = 3.0, 0.6
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(dim=1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    got = kd_loss(s, t, y, temperature=T, alpha=alpha, hard_loss=F.cross_entropy)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(
        kd_loss(s, t, y, temperature=T, alpha=0.0, hard_loss=F.cross_entropy), F.cross_entropy(s, y)
    )
    assert float(
        kd_loss(t, t, y, temperature=T, alpha=1.0, hard_loss=F.cross_entropy)
    ) == pytest.approx(0.0, abs=1e-6)


def test_distillation_trains_the_student_and_freezes_the_teacher(
    trained_resnet, data, tmp_path, example
):
    state = state_for(trained_resnet, example)
    state = state.replace(model=TinyResNet(width=16))
    teacher_before = copy.deepcopy(state.teacher.state_dict())
    ctx = context(data, tmp_path)
    acc_before = top1(lambda x: state.model.eval()(x), ctx.eval_data)
    out = cz.Distillation(epochs=3, lr=0.05).apply(state, ctx)
    assert all(torch.equal(v, out.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert top1(lambda x: out.model.eval()(x), ctx.eval_data) > max(acc_before, 0.5)
    assert out.details["train_loss"][-1] < out.details["train_loss"][0]
    assert not out.model.training


def test_training_stops_on_a_diverging_loss(data, tmp_path, example):
    with pytest.raises(cz.UserError, match=r"lower the learning rate \(lr=1e\+20\)"):
        cz.SparsityTraining(epochs=1, lr=1e20).apply(
            state_for(TinyResNet(), example), context(data, tmp_path)
        )


def test_a_training_stage_takes_the_optimizer_it_is_given(trained_resnet, data, tmp_path, example):
    sgd, adamw = optimizer_for(TinyResNet(), 0.01), optimizer_for(TinyResNet(), 0.01, "adamw")
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.01
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == pytest.approx(2e-4)
    layer_norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert isinstance(optimizer_for(layer_norm, 0.01), torch.optim.AdamW)
    assert isinstance(optimizer_for(layer_norm, 0.01, "sgd"), torch.optim.SGD)
    # the stage passes it on: SGD is what auto picks here, AdamW trains to other weights
    ctx = context(data, tmp_path, limit_train_batches=2)
    trained = {
        kind: cz.Distillation(epochs=1, optimizer=kind)
        .apply(state_for(trained_resnet, example), ctx)
        .model.state_dict()
        for kind in ("auto", "sgd", "adamw")
    }
    assert all(torch.equal(v, trained["sgd"][k]) for k, v in trained["auto"].items())
    auto = cz.Distillation(epochs=1).apply(state_for(trained_resnet, example), ctx)
    assert auto.details["optimizer"] == {"kind": "sgd"}  # what auto resolved to
    assert not all(torch.equal(v, trained["adamw"][k]) for k, v in trained["auto"].items())
    with pytest.raises(
        cz.RecipeError, match=r"optimizer must be one of 'auto', 'probe', 'sgd', 'adamw'"
    ):
        cz.SparsityTraining(optimizer="adam")


def test_the_teacher_loss_mixes_soft_targets_with_the_task_loss(
    trained_resnet, data, tmp_path, example
):
    ctx = context(data, tmp_path)
    x, y = next(iter(data[0]))
    student = TinyResNet().eval()
    with torch.no_grad():
        s, t = student(x), trained_resnet.eval()(x)
        for alpha in (0.0, 0.3, 1.0):
            with teacher_loss(trained_resnet, ctx, example, temperature=2.0, alpha=alpha) as loss:
                got, logits = loss(student, x, y)
            want = kd_loss(s, t, y, temperature=2.0, alpha=alpha, hard_loss=F.cross_entropy)
            assert torch.allclose(got, want, atol=1e-5) and torch.equal(logits, s)
        # a student that answers as the teacher does has nothing to learn from it
        with teacher_loss(trained_resnet, ctx, example, temperature=2.0, alpha=1.0) as loss:
            assert float(loss(trained_resnet, x, y)[0]) == pytest.approx(0.0, abs=1e-6)
        penalty = torch.tensor(0.25)
        with teacher_loss(trained_resnet, ctx, example, temperature=2.0, alpha=0.0,
                          extra=lambda: penalty) as loss:  # fmt: skip
            assert float(loss(student, x, y)[0]) == pytest.approx(
                float(F.cross_entropy(s, y)) + 0.25
            )


def test_sparsity_training_learns_from_the_original_model_when_asked(
    trained_resnet, data, tmp_path, example
):
    ctx = context(data, tmp_path, limit_train_batches=3)
    runs = {
        alpha: cz.SparsityTraining(epochs=1, alpha=alpha).apply(
            state_for(trained_resnet, example), ctx
        )
        for alpha in (0.0, 0.7)
    }
    # the soft targets change the loss, and so the weights it trains to
    assert runs[0.0].details["train_loss"] != runs[0.7].details["train_loss"]
    with pytest.raises(
        cz.RecipeError, match=r"sparsity_training.alpha must be a number in \[0.0, 1.0\]"
    ):
        cz.SparsityTraining(alpha=1.5)


def test_the_optimizer_probe_keeps_the_one_that_fine_tunes_best(trained_resnet, data, tmp_path):
    ctx = context(data, tmp_path)

    def loss(m, x, y):
        return F.cross_entropy(m(x), y)

    # SGD at 5 throws the trained network off; AdamW runs at 5 x 0.02 = 0.1 and does less harm
    kind, losses = probe_optimizer(trained_resnet, ctx, loss, lr=5.0)
    assert kind == "adamw" and not losses["sgd"] < losses["adamw"]
    # at a small rate SGD fine-tunes it at least as well as the start
    kind, losses = probe_optimizer(trained_resnet, ctx, loss, lr=1e-3)
    assert losses[kind] == min(losses["sgd"], losses["adamw"])
    assert set(losses) == {"start", "sgd", "adamw"}
    # a stage asked to probe says what it chose and why
    out = cz.Distillation(epochs=1, optimizer="probe").apply(
        state_for(trained_resnet, next(iter(data[0]))[0][:1]),
        context(data, tmp_path, limit_train_batches=2),
    )
    assert out.details["optimizer"]["kind"] in ("sgd", "adamw")
    assert set(out.details["optimizer"]["probe"]) == {"start", "sgd", "adamw"}
