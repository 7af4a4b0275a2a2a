import copy

import pytest
import torch
from conftest import TinyConcatNet, TinyNoBNNet, TinyResNet
from torch import nn

import compressor as cz
from compressor.pruning.engine import prune
from compressor.training.loop import recalibrate_batchnorm

MODELS = [TinyResNet, TinyConcatNet, TinyNoBNNet]


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_pruning_removes_channels_for_real(cls, example):
    torch.manual_seed(0)
    model = cls().eval()
    before = widths(model)
    pruned, details = prune(
        copy.deepcopy(model), example, cz.StructuredPruning(ratio=0.5, round_to=None)
    )
    after = widths(pruned)
    assert all(after[n] < before[n] for n in before)
    assert details["pruning"]["params_ratio"] < 0.5
    assert details["pruning"]["macs_ratio"] < 0.5
    assert pruned(example).shape == model(example).shape == (1, 4)
    head = list(pruned.modules())[-1] if cls is not TinyResNet else pruned.fc
    assert isinstance(head, nn.Linear)
    assert head.out_features == 4


def test_depthwise_and_concat_stay_consistent(example):
    pruned, _ = prune(
        TinyConcatNet().eval(), example, cz.StructuredPruning(ratio=0.5, round_to=None)
    )
    dw = pruned.dw[0]
    assert (
        dw.groups
        == dw.in_channels
        == dw.out_channels
        == pruned.a[0].out_channels + pruned.b[0].out_channels
    )


def test_flatten_to_linear_shrinks_the_linear_input(example):
    pruned, _ = prune(TinyNoBNNet().eval(), example, cz.StructuredPruning(ratio=0.5, round_to=None))
    assert pruned.classifier[1].in_features == pruned.features[3].out_channels * 16


def test_round_to_keeps_channel_counts_multiples(example):
    pruned, _ = prune(
        TinyResNet(width=48).eval(), example, cz.StructuredPruning(ratio=0.4, round_to=8)
    )
    assert all(w % 8 == 0 for w in widths(pruned).values())


def test_layers_too_narrow_for_round_to_are_left_whole(example):
    model = TinyResNet(width=16).eval()
    pruned, details = prune(model, example, cz.StructuredPruning(ratio=0.5, round_to=16))
    assert widths(pruned)["stem.0"] == 16
    assert "stem.0" in details["pruning"]["left_whole"]


def test_layers_ratio_would_cut_below_round_to_keep_round_to_channels(example):
    # width 48 at ratio 0.7 keeps 14.4 channels: below 16, so those layers keep 16 (not 0,
    # and not all 48); the 96-wide layer keeps 96 * 0.3 = 28.8 -> 16 as round_to rounds down.
    model = TinyResNet(width=48).eval()
    pruned, details = prune(model, example, cz.StructuredPruning(ratio=0.7, round_to=16))
    found = widths(pruned)
    assert found["stem.0"] == found["conv1"] == 16
    assert found["down.0"] == 16
    assert "stem.0" in details["pruning"]["kept_at_round_to"]
    assert "stem.0" not in details["pruning"]["left_whole"]


def test_ignored_layers_are_left_whole_and_unknown_names_fail(example):
    pruned, _ = prune(
        TinyResNet().eval(),
        example,
        cz.StructuredPruning(ratio=0.5, ignored_layers=("down.0",), round_to=None),
    )
    assert pruned.down[0].out_channels == 64
    with pytest.raises(cz.RecipeError, match=r"has no layer 'nope'"):
        prune(TinyResNet().eval(), example, cz.StructuredPruning(ignored_layers=("nope",)))


def test_bn_scale_importance_needs_batchnorm(example):
    with pytest.raises(cz.RecipeError, match="needs BatchNorm"):
        prune(TinyNoBNNet().eval(), example, cz.StructuredPruning(importance="bn_scale"))


def test_bn_scale_importance_removes_the_smallest_gammas(example):
    model = TinyResNet().eval()
    with torch.no_grad():
        model.down[1].weight.copy_(torch.linspace(0.01, 1.0, 64))
    pruned, _ = prune(
        model, example, cz.StructuredPruning(ratio=0.5, importance="bn_scale", round_to=None)
    )
    assert pruned.down[1].weight.min() > 0.45  # the 32 smallest gammas went


def test_a_group_whose_pruning_breaks_the_model_is_left_whole_and_said(example):
    """Flattening everything and slicing: the channels cannot be mapped, so none go."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1)[:8].unsqueeze(0))

    model = Bad().eval()
    with pytest.warns(UserWarning, match=r"\(conv\) were left whole"):
        pruned, details = prune(
            copy.deepcopy(model), example, cz.StructuredPruning(ratio=0.5, round_to=None)
        )
    assert "conv" in details["pruning"]["left_whole"]
    assert details["notes"][-1].startswith("1 channel groups (conv) were left whole")
    assert "removed 0% of the prunable channels" in " ".join(details["notes"])
    assert torch.equal(pruned(example), model(example))


def test_batchnorm_recalibration_refreshes_statistics(data):
    model = TinyResNet()
    model.bn1.running_mean.fill_(100.0)
    seen = recalibrate_batchnorm(model, cz.DataSpec(data[0]), batches=2)
    assert seen == 64
    assert model.bn1.running_mean.abs().max() < 10
    assert not model.training


def test_untraceable_blocks_are_left_whole_and_pruned_around():
    """ShuffleNetV2's channel shuffle defeats torch-pruning's tracing of the whole model."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"channel shuffle of ShuffleNetV2 \(stage2\.0"):
        pruned, details = prune(copy.deepcopy(model), x, cz.StructuredPruning(ratio=0.5))
    p = details["pruning"]
    # each unit's second branch is self-contained: its inner 1x1 -> depthwise width shrinks
    assert "stage3.1.branch2" in p["pruned_blocks"]
    assert pruned.stage3[1].branch2[0].out_channels < model.stage3[1].branch2[0].out_channels
    # the shuffle blocks are named as left whole; the first branch of a down-sampling unit
    # starts with a depthwise conv tied to its input, so it is put back as it was
    assert {"stage2.0", "stage2.0.branch1"} <= set(p["left_whole"])
    assert pruned.stage2[0].branch1[0].weight.shape == model.stage2[0].branch1[0].weight.shape
    assert 0.5 < p["params_ratio"] < 0.95
    assert details["notes"] and "pruned only inside" in details["notes"][0]
    assert pruned(x).shape == model(x).shape
