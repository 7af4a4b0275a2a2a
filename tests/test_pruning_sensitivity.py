"""Pruning sensitivity: each channel group's accuracy drop when it alone is pruned."""

import copy
import json
import warnings

import pytest
import torch
from conftest import TinyResNet, fit
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

import compressor as cz
from compressor.data import data_subset
from compressor.pruning.engine import prune
from compressor.runtime.measure import count_params_macs, top1, torch_predictor


def test_each_group_pruned_alone_matches_pruning_only_that_group(trained_resnet, example, data):
    before = copy.deepcopy(trained_resnet.state_dict())
    found = cz.pruning_sensitivity(trained_resnet, example, data[1], samples=96)
    assert all(torch.equal(before[k], v) for k, v in trained_resnet.state_dict().items())
    assert found["samples"] == 96 and found["failed"] == [] and found["importance"] == "bn_scale"
    roots = [g["group"] for g in found["groups"]]
    assert set(roots) == {"conv1", "conv2", "down.0"}  # conv2's group holds the stem (residual)
    means = [g["mean_drop"] for g in found["groups"]]
    assert means == sorted(means, reverse=True)
    subset = data_subset(data[1], 96)
    for group in found["groups"]:
        others = [r for r in roots if r != group["group"]]
        saved = [p["macs_saved"] for p in group["ratios"]]
        assert saved == sorted(saved) and saved[0] > 0  # more pruning saves more MACs
        for point in group["ratios"]:
            assert point["removed"] == round(point["ratio"] * group["width"])
            # the same channels removed by the pruning stage with every other group ignored
            alone = cz.StructuredPruning(
                ratio=point["ratio"], global_pruning=False, round_to=None, ignored_layers=others
            )
            pruned, _ = prune(copy.deepcopy(trained_resnet), example, alone)
            accuracy = top1(torch_predictor(pruned), subset)
            assert point["accuracy"] == pytest.approx(accuracy, abs=1e-6)
            assert point["drop"] == pytest.approx(found["accuracy"] - accuracy, abs=1e-6)
            _, macs = count_params_macs(pruned, example)
            assert point["macs_saved"] == pytest.approx(1 - macs / found["macs"], abs=1e-5)


def test_options_rank_and_round_as_the_stage_does(trained_resnet, example, data):
    options = cz.StructuredPruning(importance="l1", round_to=8, ignored_layers=("conv1",))
    found = cz.pruning_sensitivity(
        trained_resnet, example, data[1], ratios=(0.3,), samples=32, options=options
    )
    assert found["importance"] == "l1" and found["ratios"] == [0.3]
    widths = {g["group"]: g for g in found["groups"]}
    assert "conv1" not in widths  # ignored
    for group in widths.values():
        (point,) = group["ratios"]
        assert (group["width"] - point["removed"]) % 8 == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratios": (0.5, 1.0)}, r"ratios must lie in \(0, 1\) \(got: \[0.5, 1.0\]\)"),
        ({"ratios": ()}, r"ratios must lie in \(0, 1\) \(got: \[\]\)"),
        ({"samples": 0}, r"samples must be at least 1 \(got: 0\)"),
        (
            {"options": cz.StructuredPruning(ignored_layers=("nope",))},
            r"nope",
        ),
    ],
)
def test_bad_arguments_are_named(trained_resnet, example, data, kwargs, message):
    with pytest.raises(cz.RecipeError, match=message):
        cz.pruning_sensitivity(trained_resnet, example, data[1], **kwargs)


def test_bad_stage_option_is_named():
    with pytest.raises(cz.RecipeError, match="sensitivity_samples"):
        cz.StructuredPruning(sensitivity=True, sensitivity_samples=0)
    with pytest.raises(cz.RecipeError, match="sensitivity"):
        cz.StructuredPruning(sensitivity="yes")


def test_the_pipeline_reports_and_charts_it(data, tmp_path):
    torch.manual_seed(0)
    model = fit(TinyResNet(), data[0], epochs=1)
    stages = [
        cz.StructuredPruning(ratio=0.4, round_to=None, sensitivity=True, sensitivity_samples=64)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cz.Pipeline(stages).run(
            model, data[0], data[1], output_dir=tmp_path, progress=False, throughput_batch=8
        )
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    found = next(r for r in rows if r["name"] == "structured_pruning")["details"]["pruning"]
    found = found["sensitivity"]
    assert found["samples"] == 64 and len(found["groups"]) == 3 and found["seconds"] > 0
    line = result.report.sensitivity_line()
    assert line.startswith("Pruning sensitivity (3 channel groups")
    assert found["groups"][0]["group"] in line
    assert line in (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert 'id="pruning-sensitivity"' in page and "<svg" in page
    assert "pruning_sensitivity" in result.report.charts()


class ShuffleBlockNet(nn.Module):
    """A ShuffleNetV2 block (channel shuffle: torch-pruning cannot trace it whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.block = InvertedResidual(24, 24, 1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def test_an_untraceable_model_is_named_and_the_stage_goes_on(data, example, tmp_path):
    model = ShuffleBlockNet().eval()
    with pytest.raises(cz.ModelError, match="channel shuffle blocks, pruned block by block"):
        cz.pruning_sensitivity(model, example, data[1], samples=16)
    stage = cz.StructuredPruning(ratio=0.3, round_to=None, sensitivity=True)
    with pytest.warns(UserWarning, match="pruning sensitivity needs a model"):
        result = cz.Pipeline([stage]).run(
            model, data[0], data[1], output_dir=tmp_path, progress=False, throughput_batch=8
        )
    found = result.report.row("structured_pruning", "torch").details["pruning"]["sensitivity"]
    assert "channel shuffle" in found["error"]
    assert result.report.sensitivity_line() is None
