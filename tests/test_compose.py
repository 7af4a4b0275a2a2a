"""Sparsity training and pruning share one plan: the channels driven to zero are the ones removed."""

import copy

import pytest
import torch
from conftest import TinyConcatNet, TinyNoBNNet, TinyResNet
from test_training_stages import context, state_for
from torch import nn

import compressor as cz
from compressor.pruning.engine import make_plan, prune
from compressor.training.loop import recalibrate_batchnorm

PRUNE = cz.StructuredPruning(ratio=0.5, round_to=None, bn_recalibration_batches=0)


def sparsify(model, data, tmp_path, example, pruning=PRUNE, **options):
    ctx = context(data, tmp_path, upcoming=(pruning,))
    stage = cz.SparsityTraining(epochs=1, **options)
    return stage.apply(state_for(model, example), ctx)


def planned_channels(model, example, pruning=PRUNE):
    plan, _, _ = make_plan(copy.deepcopy(model), example, pruning)
    return {g.root: g.remove for g in plan.groups}


@pytest.mark.parametrize("cls", [TinyResNet, TinyNoBNNet, TinyConcatNet], ids=lambda c: c.__name__)
def test_growing_penalty_zeroes_exactly_the_planned_channels_and_pruning_removes_them(
    cls, data, tmp_path, example
):
    torch.manual_seed(0)
    model = cls().eval()
    planned = planned_channels(model, example)
    out = sparsify(model, data, tmp_path, example)
    info = out.details["sparsity"]
    assert info["method"] == "growing"
    assert info["scheduled_channels"] == sum(len(v) for v in planned.values()) > 0
    assert info["scheduled_zero_fraction"] == 1.0
    assert info["scheduled_scale_remaining"] == 0.0
    sparse = out.model.eval()
    # the plan made again on the sparsified model removes the same, now dead, channels
    assert planned_channels(sparse, example) == planned
    x = next(iter(data[1]))[0][:16]
    with torch.no_grad():
        before = sparse(x)
    pruned, details = prune(copy.deepcopy(sparse), example, PRUNE)
    with torch.no_grad():
        after = pruned(x)
    assert details["pruning"]["removed_at_zero_fraction"] == 1.0
    assert details["pruning"]["removed_channels"] == info["scheduled_channels"]
    assert torch.allclose(before, after, atol=1e-5)
    assert details["pruning"]["macs_ratio"] < 0.5


def test_channels_that_are_exactly_zero_prune_with_no_change_in_output(example):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    dead = [1, 4, 9]
    with torch.no_grad():  # the down block's channels 1, 4, 9 output exactly zero
        model.down[1].weight[dead] = 0
        model.down[1].bias[dead] = 0
        before = model(example)
    options = cz.StructuredPruning(ratio=0.1, round_to=None, global_pruning=False)
    planned = planned_channels(model, example, options)
    assert set(dead) <= set(planned["down.0"])  # dead channels go first
    pruned, details = prune(copy.deepcopy(model), example, options)
    assert details["pruning"]["removed_at_zero_fraction"] < 1.0  # the ratio asked for more
    only_dead = cz.StructuredPruning(ratio=0.02, round_to=None)  # 3 of 128 channels
    pruned, _ = prune(copy.deepcopy(model), example, only_dead)
    assert pruned.down[0].out_channels == 64 - len(dead)
    assert torch.allclose(pruned(example), before, atol=1e-5)


def test_global_allocation_follows_the_scores_within_the_layer_cap(example):
    model = TinyResNet().eval()
    with torch.no_grad():  # the down block's gammas are far below every other layer's
        model.down[1].weight.uniform_(0.001, 0.01)
    options = cz.StructuredPruning(ratio=0.5, round_to=None)
    pruned, details = prune(copy.deepcopy(model), example, options)
    p = details["pruning"]
    assert p["allocation"] == "global"
    assert p["max_layer_ratio"] == pytest.approx(0.75)
    assert pruned.down[0].out_channels == 16  # capped at 0.75, not emptied
    assert p["removed_fraction"] == pytest.approx(0.5, abs=0.01)
    assert p["layer_ratio_min"] < p["layer_ratio_max"]

    uniform = cz.StructuredPruning(ratio=0.3, round_to=None, global_pruning=False)
    pruned, details = prune(copy.deepcopy(model), example, uniform)
    assert details["pruning"]["allocation"] == "uniform"
    assert pruned.down[0].out_channels == 44  # int(64 * 0.7), as torch-pruning counts
    assert pruned.conv1.out_channels == 22


def test_global_allocation_keeps_round_to_multiples_and_a_floor(example):
    model = TinyResNet(width=48).eval()
    with torch.no_grad():
        model.down[1].weight.uniform_(0.001, 0.01)
    options = cz.StructuredPruning(ratio=0.5, round_to=16, max_layer_ratio=0.9)
    pruned, details = prune(copy.deepcopy(model), example, options)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 16 == 0 and w >= 16 for w in widths)
    assert pruned.down[0].out_channels == 16
    assert "down.0" in details["pruning"]["kept_at_round_to"]


def test_sparsity_with_no_pruning_after_it_uses_the_uniform_penalty_and_says_so(
    data, tmp_path, example
):
    ctx = context(data, tmp_path)  # nothing upcoming
    out = cz.SparsityTraining(epochs=1).apply(state_for(TinyResNet(), example), ctx)
    assert out.details["sparsity"]["method"] == "l1"
    assert "no structured_pruning stage follows" in out.details["notes"][0]


def test_ramp_and_method_are_validated():
    with pytest.raises(cz.RecipeError, match=r"method must be one of 'growing', 'l1'"):
        cz.SparsityTraining(method="slim")
    with pytest.raises(cz.RecipeError, match=r"ramp must be a number in \(0\.0, 1\.0\]"):
        cz.SparsityTraining(ramp=0)
    with pytest.raises(cz.RecipeError, match=r"max_layer_ratio .*\(got: 1\.0\)"):
        cz.StructuredPruning(max_layer_ratio=1.0)


def test_batchnorm_recalibration_leaves_dropout_off(data):
    seen_training = []

    class Probe(nn.Module):
        def forward(self, x):
            seen_training.append(self.training)
            return x

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Probe(), nn.Dropout(0.5), nn.Flatten()
    )
    recalibrate_batchnorm(model, cz.DataSpec(data[0]), batches=2)
    assert seen_training == [False, False]
    assert not model.training
