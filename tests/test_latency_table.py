"""Latency-aware allocation: the per-layer INT8 latency table and the plan it steers."""

import copy
import warnings

import pytest
import torch
from torch import nn

import compressor as cz
from compressor.pruning.engine import make_plan, prune
from compressor.pruning.latency_table import channel_costs, layer_slopes
from compressor.pruning.plan import Allocation, PlannedGroup, allocate


class WideThenSmall(nn.Module):
    """A conv at 128x128, then two at 8x8: a channel of the first costs far more time."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.pool = nn.AvgPool2d(16)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c1(x)))
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _group(root: str, scores: list[float]) -> PlannedGroup:
    scores_t = torch.tensor(scores)
    return PlannedGroup(
        root=root, out_channels=True, width=len(scores), scores=scores_t,
        dead=torch.zeros(len(scores), dtype=torch.bool), members=[root],
    )  # fmt: skip


def test_allocation_ranks_channels_by_score_per_cost():
    def removed(cost):
        groups = [_group("a", [1.0] * 16), _group("b", [1.0 + 1e-3] * 16)]
        allocate(groups, Allocation(ratio=0.25, round_to=None, cost=cost))
        return {g.root: len(g.remove) for g in groups}

    assert removed(None) == {"a": 8, "b": 0}  # by score alone: the lower one goes first
    # b's channels save four times as much time each: now they go first
    assert removed({"a": 1.0, "b": 4.0}) == {"a": 0, "b": 8}
    # uniform allocation ignores costs
    groups = [_group("a", [1.0] * 16), _group("b", [2.0] * 16)]
    allocate(groups, Allocation(ratio=0.25, global_allocation=False, cost={"a": 1.0, "b": 9.0}))
    assert [len(g.remove) for g in groups] == [4, 4]


def test_the_table_times_every_layer_and_a_large_feature_map_costs_more():
    model = WideThenSmall().eval()
    x = torch.randn(1, 3, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = layer_slopes(model, x, "onnxruntime", threads=1)
        plan, _, _ = make_plan(model, x, cz.StructuredPruning(ratio=0.3, round_to=None), 1)
    assert set(table) == {"c1", "c2", "c3", "fc"}
    assert all(s.ms > 0 for s in table.values())
    # one output channel of c1 is 128x128x27 MACs, one of c2 8x8x288: 25 times fewer
    assert table["c1"].per_out_channel > 3 * table["c2"].per_out_channel
    groups = {g.root: g for g in plan.groups_seen}
    assert groups["c1"].consumers == ["c2"] and groups["c2"].consumers == ["c3"]
    costs = channel_costs(plan.groups_seen, table)
    assert costs["c1"] > costs["c2"] and costs["c1"] > costs["c3"]
    assert min(costs.values()) > 0


def test_latency_aware_pruning_reports_its_table_and_prunes_the_costly_group_harder():
    model = WideThenSmall().eval()
    x = torch.randn(1, 3, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = cz.StructuredPruning(ratio=0.3, round_to=None, latency_aware=True)
        pruned, details = prune(copy.deepcopy(model), x, options, threads=1)
        plain, _ = prune(copy.deepcopy(model), x, cz.StructuredPruning(ratio=0.3, round_to=None))
    found = details["pruning"]
    assert found["allocation"] == "latency"
    table = found["latency_table"]
    assert table["runtime"] == "onnxruntime" and table["threads"] == 1 and table["layers"] == 4
    assert table["groups"][0]["group"] == "c1"  # the costliest per channel first
    assert pruned.c1.out_channels < plain.c1.out_channels
    assert pruned(x).shape == (1, 4)


def test_latency_aware_needs_global_allocation():
    with pytest.raises(cz.RecipeError, match="latency_aware allocates channels across groups"):
        cz.StructuredPruning(latency_aware=True, global_pruning=False)
    with pytest.raises(cz.RecipeError, match="latency_aware must be true or false"):
        cz.StructuredPruning(latency_aware="yes")


def test_a_layer_too_narrow_to_halve_saves_nothing_per_channel():
    """A one-output head (a binary score) cannot lose half its channels: slope 0, no error."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = layer_slopes(model.eval(), torch.randn(1, 1, 8, 8), "onnxruntime", threads=1)
    assert set(table) == {"0", "3"}
    assert table["3"].per_out_channel == 0.0 and table["0"].per_in_channel == 0.0
    assert table["3"].ms > 0
