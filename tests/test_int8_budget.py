"""Accuracy budgets: INT8 sensitivity, reverting nodes to FP32, and over-budget artifacts."""

import itertools
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyResNet, fit, loaders
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from torch import nn

import compressor as cz
from compressor.quantization.budget import (
    _fewest,
    graph_prefixes,
    quantized_nodes,
    revert_to_budget,
)
from compressor.quantization.calibration import _CalibrationReader
from compressor.quantization.placement import keep_fp32
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import onnx_predictor, sample_batch, top1
from compressor.stage import RunContext

OUTLIER = 300.0


class OutlierNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> conv -> pool -> linear; `add_outlier` scales one
    channel of the first conv's output up and the second conv's weights on it down: the
    same function in FP32, but 8 bits for that activation leave the other channels ~0."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.fc(self.conv2(x).mean(dim=(2, 3)))

    @torch.no_grad()
    def add_outlier(self) -> None:
        self.conv0.weight[0] *= OUTLIER
        self.conv0.bias[0] *= OUTLIER
        self.conv0.bias[0] = self.conv0.bias[0].abs() + OUTLIER  # always on, always large
        self.conv1.weight[:, 0] /= OUTLIER


@pytest.fixture(scope="module")
def outlier_model(data):
    torch.manual_seed(0)
    model = fit(OutlierNet(), loaders()[0], epochs=4).eval()
    with torch.no_grad():
        model.conv1.weight[:, 0] = 0  # channel 0 carries nothing: scaling it keeps the function
    x = sample_batch(cz.DataSpec(data[1]), 64)
    before = model(x)
    model.add_outlier()
    assert torch.allclose(model(x), before, atol=1e-3)
    return model


def _files(model, data, tmp_path):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, torch.randn(1, 3, 16, 16), fp32, threads=1)
    reader = _CalibrationReader(cz.DataSpec(data[0]), ["input"], 64, False, 64)
    quantize_static(str(fp32), str(int8), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return fp32, int8


def test_sensitivity_ranks_the_node_that_reads_the_outlier_first(outlier_model, data, tmp_path):
    fp32, int8 = _files(outlier_model, data, tmp_path)
    found = cz.int8_sensitivity(int8, fp32, data[1], samples=64, threads=1)
    names = [n["node"] for n in found["nodes"]]
    assert len(names) == len(quantized_nodes(onnx.load(int8), onnx.load(fp32))) == 4
    assert "conv1" in names[0]
    assert found["nodes"][0]["gain"] > 0.5 > found["nodes"][-1]["gain"]
    assert found["error_int8"] > 0 and found["samples"] == 64


def test_float_inputs_read_the_activation_and_put_back_the_clipped_relu(
    outlier_model, data, tmp_path
):
    fp32, int8 = _files(outlier_model, data, tmp_path)
    source = onnx.load(fp32)
    conv1 = next(n.name for n in source.graph.node if "conv1" in n.name)
    x = sample_batch(cz.DataSpec(data[1]), 64)
    reference = onnx_predictor(fp32, 1)(x)
    errors = {}
    for float_inputs in (False, True):
        edited = keep_fp32(onnx.load(int8), source, [conv1], float_inputs=float_inputs)
        onnx.checker.check_model(edited)
        path = tmp_path / f"edited_{float_inputs}.onnx"
        onnx.save(edited, path)
        errors[float_inputs] = float((onnx_predictor(path, 1)(x) - reference).abs().mean())
        produced = {o: n for n in edited.graph.node for o in n.output}
        node = next(n for n in edited.graph.node if n.name == conv1)
        reads = produced[node.input[0]].op_type
        assert reads == ("Relu" if float_inputs else "DequantizeLinear")
    assert errors[True] < errors[False] / 5


def test_budget_reverts_a_few_nodes_not_all(outlier_model, data, tmp_path):
    stage = cz.Int8Quantization(calibration_samples=64, fp32_placement=False, qat="never")
    result = cz.Pipeline([stage], max_accuracy_drop=0.02).run(
        outlier_model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    assert result.budget_met is True
    assert result.onnx_path == tmp_path / "model.int8.onnx"
    budget = result.report.row("int8_quantization", "onnxruntime").details["quantization"][
        "accuracy_budget"
    ]
    assert budget["int8_accuracy"] < budget["min_accuracy"] <= budget["accuracy"]  # lost, won back
    assert 1 <= len(budget["fp32_nodes"]) < 4 and "conv1" in budget["fp32_nodes"][0]
    assert budget["trials"] and budget["sensitivity"]["nodes"]
    assert any("conv0" in n for n in budget["fp32_producers"])  # it feeds conv1 in float now
    graph = result.report.row("int8_quantization", "onnxruntime").details["quantization"]
    assert not graph["float_compute_ops"]  # every FP32 op is there by choice
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["budget"]["met"] is True
    assert document["budget"]["max_accuracy_drop"] == 0.02
    assert "Accuracy budget met" in (tmp_path / "report.md").read_text()
    assert 'id="sensitivity"' in (tmp_path / "report.html").read_text()
    assert set(result.report.charts()) >= {"sensitivity"}


def test_stage_budget_without_a_pipeline_budget(outlier_model, data, tmp_path):
    stage = cz.Int8Quantization(
        calibration_samples=64, fp32_placement=False, max_accuracy_drop=0.02, qat="never"
    )
    result = cz.Pipeline([stage]).run(
        outlier_model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    assert result.budget_met is None  # no pipeline budget
    budget = result.report.row("int8_quantization", "onnxruntime").details["quantization"][
        "accuracy_budget"
    ]
    assert budget["met"] and budget["fp32_nodes"]
    assert budget["min_accuracy"] == pytest.approx(budget["fp32_accuracy"] - 0.02, abs=1e-6)


def test_missed_budget_keeps_the_artifact_under_a_name_that_says_so(data, tmp_path):
    torch.manual_seed(0)
    model = fit(TinyResNet(), data[0])
    (tmp_path / "model.int8.onnx").write_text("an earlier run's artifact")
    stages = [
        cz.StructuredPruning(ratio=0.9, round_to=1),
        cz.Int8Quantization(calibration_samples=32, fp32_placement=False),
    ]
    result = cz.Pipeline(stages, max_accuracy_drop=0.0).run(
        model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    assert result.budget_met is False
    assert result.onnx_path == tmp_path / "model.int8.over-budget.onnx"
    assert result.onnx_path.is_file() and not (tmp_path / "model.int8.onnx").exists()
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["budget"]["met"] is False
    assert document["budget"]["artifact"] == "model.int8.over-budget.onnx"
    assert document["rows"][-1]["details"]["file"] == "model.int8.over-budget.onnx"
    assert document["budget"]["accuracy_drop"] > 0
    assert "NOT met" in result.report.budget_line()
    assert "max_search_minutes to search it" in result.report.budget_line()  # none ran
    budget = result.report.row("int8_quantization", "onnxruntime").details["quantization"]
    assert budget["accuracy_budget"]["trials"] == []  # lost before INT8: nothing reverted
    assert any("already under the accuracy budget" in n for n in result.report.notes())
    assert cz.Report.load(tmp_path / "report.json").budget == document["budget"]


class SpreadOutlierNet(OutlierNet):
    """`OutlierNet` with a HardSwish after the first conv: ONNX Runtime quantizes the
    HardSwish's input as well as its output, so no conv reverted on its own (nor all of
    them) reads the first conv's output unrounded; only the conv and the activation
    reverted together do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(nn.functional.hardswish(self.conv0(x))))
        return self.fc(self.conv2(x).mean(dim=(2, 3)))


def _order(fewest: int, tried: list):
    """``meets`` of an order whose smallest passing count is ``fewest``, noting each count."""
    return lambda count: tried.append(count) or count >= fewest


@pytest.mark.parametrize(
    ("ranking", "prefix", "limits", "expected"),
    [
        (5, 2, (8, 8), ("prefix", 2)),
        (2, 2, (8, 8), ("ranking", 2)),  # a tie: the earlier order
        (3, 4, (8, 8), ("ranking", 3)),  # both meet at 4: the prefix tried below 3 only
        (9, 6, (8, 7), ("prefix", 6)),  # the ranking's limit fails
        (9, 9, (8, 7), None),
        (1, 1, (0, 3), ("prefix", 1)),  # no ranking at all
    ],
)
def test_fewest_tries_the_orders_side_by_side(ranking, prefix, limits, expected):
    tried = {"ranking": [], "prefix": []}
    orders = {
        "ranking": (_order(ranking, tried["ranking"]), limits[0]),
        "prefix": (_order(prefix, tried["prefix"]), limits[1]),
    }
    assert _fewest(orders) == expected
    for name, counts in tried.items():
        assert len(counts) == len(set(counts)), f"{name} tried a count twice: {counts}"
        assert all(1 <= c <= limits[name == "prefix"] for c in counts)
    if expected:  # nothing above the doubling's round that met was tried
        rounds = max(max(c) for c in tried.values() if c)
        assert rounds <= 2 * expected[1]


def test_graph_prefixes_count_compute_nodes_and_skip_excluded(outlier_model, data, tmp_path):
    fp32, int8 = _files(outlier_model, data, tmp_path)
    quantized, source = onnx.load(int8), onnx.load(fp32)
    prefixes = graph_prefixes(quantized, source)
    kinds = {n.name: n.op_type for n in quantized.graph.node}
    computes = [[n for n in p if kinds[n] in ("Conv", "Gemm", "MatMul")] for p in prefixes]
    assert [len(c) for c in computes] == [1, 2, 3, 4]
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(prefixes))  # each extends the last
    assert not any(kinds[n] in ("QuantizeLinear", "DequantizeLinear") for n in prefixes[-1])
    conv1 = computes[1][1]
    assert [len(p) for p in graph_prefixes(quantized, source, exclude=[conv1])][:2] == [
        len(prefixes[1]) - 1,
        len(prefixes[2]) - 1,
    ]
    # the whole graph reverted with float inputs computes what the FP32 model does, up to
    # the rounding of the output (its Quantize/Dequantize stays)
    x = sample_batch(cz.DataSpec(data[1]), 16)
    path = tmp_path / "all.onnx"
    edited = keep_fp32(quantized, source, prefixes[-1], float_inputs=True)
    onnx.save(edited, path)
    step = _output_scale(edited)
    reference = onnx_predictor(fp32, 1)(x)
    assert (onnx_predictor(path, 1)(x) - reference).abs().max() <= step / 2 + 1e-4
    assert (onnx_predictor(int8, 1)(x) - reference).abs().max() > 2 * step
    with pytest.raises(ValueError, match="no compute node"):  # an activation needs float inputs
        keep_fp32(quantized, source, [next(n for n in prefixes[-1] if n not in computes[-1])])


@pytest.mark.parametrize("again", [True, False])
def test_a_prefix_gives_a_node_fp32_placement_kept_float_inputs(
    outlier_model, data, tmp_path, again
):
    """FP32 placement keeps a conv in FP32 that still reads its quantized input; unless the
    budget's prefixes revert it again, no count of nodes brings the FP32 accuracy back."""
    fp32, int8 = _files(outlier_model, data, tmp_path)
    quantized, source = onnx.load(int8), onnx.load(fp32)
    conv1 = next(n.name for n in source.graph.node if "conv1" in n.name)
    placed = tmp_path / "placed.onnx"
    onnx.save(keep_fp32(quantized, source, [conv1]), placed)  # as FP32 placement does
    ctx = RunContext(
        train_data=cz.DataSpec(data[0]), eval_data=cz.DataSpec(data[1]), output_dir=tmp_path,
        loss_fn=F.cross_entropy, eval_fn=top1, device=torch.device("cpu"), progress=False,
        step="int8_quantization", threads=1,
    )  # fmt: skip
    accuracy = top1(onnx_predictor(fp32, 1), ctx.eval_data)
    broken = top1(onnx_predictor(placed, 1), ctx.eval_data)
    assert broken < accuracy - 0.1  # conv1 in FP32 still reads the rounded outlier
    # halfway: all reverted (the output's rounding stays) is above it, the rest under
    _, info = revert_to_budget(
        placed, fp32, ctx, (accuracy + broken) / 2, samples=32, exclude=[conv1],
        in_prefix=[conv1] if again else (),
    )  # fmt: skip
    assert info["met"] is again, info["trials"]
    if again:
        assert info["order"] == "prefix" and conv1 in info["fp32_nodes"]


def _output_scale(model: onnx.ModelProto) -> float:
    """The quantization step of the model's output (a Dequantize writes it)."""
    produced = {o: n for n in model.graph.node for o in n.output}
    dq = produced[model.graph.output[0].name]
    assert dq.op_type == "DequantizeLinear"
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    return float(onnx.numpy_helper.to_array(scale))


def test_budget_reverts_the_first_layers_together_when_no_single_node_helps(data, tmp_path):
    torch.manual_seed(0)
    model = fit(SpreadOutlierNet(), loaders()[0], epochs=4).eval()
    with torch.no_grad():
        model.conv1.weight[:, 0] = 0
    model.add_outlier()
    stage = cz.Int8Quantization(calibration_samples=64, fp32_placement=False, qat="never")
    result = cz.Pipeline([stage], max_accuracy_drop=0.05).run(
        model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    budget = result.report.row("int8_quantization", "onnxruntime").details["quantization"][
        "accuracy_budget"
    ]
    assert budget["int8_accuracy"] < budget["min_accuracy"] <= budget["accuracy"]
    assert result.budget_met is True and budget["order"] == "prefix"
    ranking = [t for t in budget["trials"] if t["order"] == "ranking"]
    # tried side by side: the ranking failed at every count the prefix was tried at
    assert {t["fp32_nodes"] for t in ranking} >= {
        t["fp32_nodes"] for t in budget["trials"] if t["order"] == "prefix"
    }
    assert all(t["accuracy"] < budget["min_accuracy"] for t in ranking)
    # conv0, the HardSwish (inlined by pre-processing into unnamed nodes, named for this)
    # and conv1, which reads it: conv0's output is no longer rounded anywhere
    assert [n.split("/")[1] for n in budget["fp32_nodes"]] == ["conv0", "conv1"]
    assert budget["fp32_other_nodes"]
    assert any("the first 2 compute node(s) and the" in n for n in result.report.notes())


@pytest.mark.parametrize("value", [-0.1, 1.0, "half", float("nan"), True])
def test_bad_budget_is_named(value):
    with pytest.raises(cz.RecipeError, match="max_accuracy_drop must be a fraction"):
        cz.Pipeline([cz.Int8Quantization()], max_accuracy_drop=value)
    with pytest.raises(cz.RecipeError, match="max_accuracy_drop"):
        cz.Pipeline.from_recipe({"max_accuracy_drop": value, "stages": ["int8_quantization"]})


def test_budget_in_recipes():
    pipeline = cz.Pipeline.from_recipe({"max_accuracy_drop": 0.01, "stages": ["int8_quantization"]})
    assert pipeline.max_accuracy_drop == 0.01
    assert pipeline.to_recipe()["max_accuracy_drop"] == 0.01
    assert cz.Pipeline.from_recipe(pipeline.to_recipe()).max_accuracy_drop == 0.01
    with pytest.raises(cz.RecipeError, match="allowed: stages, max_accuracy_drop"):
        cz.Pipeline.from_recipe({"budget": 0.01, "stages": ["int8_quantization"]})


def test_cli_exits_3_when_the_budget_is_missed(tmp_path, capsys):
    from conftest import write_image_folder

    from compressor.cli import main
    from compressor.commands.compress import OVER_BUDGET_STATUS

    images = write_image_folder(tmp_path / "images", train=24, val=12)
    recipe = tmp_path / "harsh.yaml"
    recipe.write_text(
        "max_accuracy_drop: 0.0\n"
        "stages:\n"
        "  - structured_pruning: {ratio: 0.9, round_to: 1}\n"
        "  - int8_quantization: {calibration_samples: 16, fp32_placement: false}\n"
    )
    out = tmp_path / "run"
    argv = ["compress", "--model", "user_models:build", "--data", f"imagefolder:{images}",
            "--input-size", "16", "--batch-size", "16", "--recipe", str(recipe),
            "--baseline-epochs", "2", "--output", str(out), "--quiet", "--threads", "1",
            "--throughput-batch", "4"]  # fmt: skip
    assert main(argv) == OVER_BUDGET_STATUS == 3
    captured = capsys.readouterr()
    assert "Accuracy budget NOT met" in captured.err
    assert "model.int8.over-budget.onnx" in captured.err
    assert (out / "model.int8.over-budget.onnx").is_file()
    assert not (out / "model.int8.onnx").exists()
    # the flag overrides the recipe's budget: a budget of 1 is met
    argv += ["--max-accuracy-drop", "0.99", "--overwrite"]
    assert main(argv) == 0
    assert (out / "model.int8.onnx").is_file() and not (
        out / "model.int8.over-budget.onnx"
    ).exists()


def test_the_ratio_search_judges_a_candidate_by_the_int8_file_the_budget_will_ship(
    outlier_model, data, tmp_path
):
    """Every node INT8 misses the budget on this model at any ratio; with the nodes the
    stage's budget reverts, a candidate meets it, and the search keeps that candidate."""
    stages = [
        cz.StructuredPruning(ratio=0.2, round_to=1),
        cz.Int8Quantization(calibration_samples=64, fp32_placement=False, qat="never"),
    ]
    result = cz.Pipeline(stages, max_accuracy_drop=0.03, max_search_minutes=2).run(
        outlier_model, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    search = result.report.row("structured_pruning", "torch").details["pruning"]["search"]
    trace = {c["ratio"]: c for c in search["trace"]}
    chosen = trace[search["ratio"]]
    assert search["met"] is True and chosen["met"] is True
    assert chosen["int8_fp32_nodes"] >= 1  # plain INT8 would have missed
    assert chosen["int8_accuracy"] >= result.report.rows[0].accuracy - 0.03
    assert result.budget_met is True
