"""Quantization-aware training: the QDQ file's own graph in torch, trained, written back."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyResNet, fit, loaders
from onnx import TensorProto, helper
from test_int8_budget import OutlierNet
from torch import nn

import compressor as cz
from compressor.errors import ModelError, RecipeError
from compressor.quantization.qdq_module import QDQModule
from compressor.runtime.measure import onnx_predictor, openvino_model, openvino_predictor
from compressor.training.teacher import kd_loss


class DepthwiseSE(nn.Module):
    """Inverted residual with a depthwise conv, squeeze-excitation (hard sigmoid) and
    hard swish; max pooling and a concatenation, as mobile nets have them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Conv2d(16, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.se = nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1))
        self.project = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.hardswish(self.depthwise(F.hardswish(self.expand(x))))
        y = y * F.hardsigmoid(self.se(y.mean(dim=(2, 3), keepdim=True)))
        x = x + self.project(y)
        x = torch.cat([F.max_pool2d(x, 2), F.avg_pool2d(x, 2)], dim=1)
        return self.head(x.mean(dim=(2, 3)))


class TinyEncoder(nn.Module):
    """Patches -> a transformer encoder layer (LayerNorm, attention, GELU MLP) -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True,
                                                activation="gelu", norm_first=True)  # fmt: skip
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.layer(tokens).mean(dim=1))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Each model trained a little, and its static QDQ INT8 file and FP32 export."""
    train, val = loaders(n_train=128, n_val=64)
    found = {}
    for name, build in (("resnet", TinyResNet), ("dwse", DepthwiseSE), ("encoder", TinyEncoder)):
        torch.manual_seed(0)
        model = fit(build(), train, epochs=2)
        folder = tmp_path_factory.mktemp(name)
        stage = cz.Int8Quantization(mode="static", calibration_samples=64, fp32_placement=False)
        cz.Pipeline([stage]).run(
            model, train, val, output_dir=folder, progress=False, threads=1, throughput_batch=8,
            runtimes=["onnxruntime"],
        )  # fmt: skip
        found[name] = (model, folder / "model.int8.onnx", folder / "model.onnx", val)
    return found


def _outputs(predict, loader):
    return torch.cat([predict(x).detach() for x, _ in loader])


@pytest.mark.parametrize("name", ["resnet", "dwse", "encoder"])
def test_the_module_computes_what_onnx_runtime_runs(quantized, name):
    _, int8, fp32, val = quantized[name]
    module = QDQModule(onnx.load(int8), onnx.load(fp32))
    ours, theirs = _outputs(module, val), _outputs(onnx_predictor(int8, 1), val)
    # INT8 kernels requantize in integers: a value on a rounding boundary can land one step
    # apart, so outputs agree to a few quantization steps, and the decisions agree
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.95
    assert (ours - theirs).abs().mean() <= 0.05 * theirs.abs().mean()
    assert not torch.equal(theirs, _outputs(onnx_predictor(fp32, 1), val))  # INT8 differs


@pytest.mark.parametrize("name", ["resnet", "dwse"])
def test_untrained_write_back_is_the_same_file_and_trained_values_go_in(quantized, name):
    _, int8, fp32, val = quantized[name]
    model, source = onnx.load(int8), onnx.load(fp32)
    module = QDQModule(model, source)
    same, float_file = module.files(model, source)
    assert {t.name for t in same.graph.initializer} == {t.name for t in model.graph.initializer}
    for before, after in zip(model.graph.initializer, same.graph.initializer, strict=True):
        a, b = onnx.numpy_helper.to_array(before), onnx.numpy_helper.to_array(after)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=before.name)
    with torch.no_grad():  # as training would: every weight and scale moves
        for param in module.params.values():
            param.mul_(1.05).add_(0.01)
    trained, float_file = module.files(model, source)
    path = int8.with_name("trained.onnx")
    onnx.save(trained, path)
    ours, theirs = _outputs(module, val), _outputs(onnx_predictor(path, 1), val)
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.95
    assert (ours - theirs).abs().mean() <= 0.05 * theirs.abs().mean()
    assert not torch.allclose(theirs, _outputs(onnx_predictor(int8, 1), val))
    assert float_file is not None  # the FP32 file carries the trained float weights
    moved = {t.name for t in float_file.graph.initializer} - {
        t.name
        for t, u in zip(float_file.graph.initializer, source.graph.initializer, strict=True)
        if np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))
    }
    assert moved


def test_training_the_module_lowers_its_distillation_loss(quantized):
    teacher, int8, fp32, _ = quantized["dwse"]
    module = QDQModule(onnx.load(int8), onnx.load(fp32))
    train, _ = loaders(n_train=128, n_val=64)

    def kd(x, y):
        with torch.no_grad():
            soft = teacher(x)
        return kd_loss(module(x), soft, y, temperature=4.0, alpha=0.7, hard_loss=F.cross_entropy)

    def loss() -> float:
        with torch.no_grad():
            return sum(float(kd(x, y)) for x, y in train)

    before = loss()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        for x, y in train:
            optimizer.zero_grad()
            kd(x, y).backward()
            optimizer.step()
    assert all(p.grad is not None for p in module.parameters())  # weights and scales
    assert loss() < 0.97 * before  # 0.93x here; unchanged if no gradient reached the file


def test_qat_in_the_pipeline_writes_a_faithful_int8_file(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(n_train=256, n_val=128)
    model = fit(DepthwiseSE(), train, epochs=2)
    stage = cz.Int8Quantization(calibration_samples=64, fp32_placement=False, qat="always",
                                qat_epochs=2)  # fmt: skip
    result = cz.Pipeline([stage]).run(
        model, train, val, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8,
        runtimes=["onnxruntime", "openvino"],
    )  # fmt: skip
    row = result.report.row("int8_quantization", "onnxruntime")
    details = row.details["quantization"]
    qat = details["qat"]
    assert qat["epochs"] == 2 and len(qat["train_loss"]) == 2
    assert qat["optimizer"]["kind"] == "adamw"
    assert qat["scales_frozen_at_step"] > 0
    # the file ONNX Runtime runs is the model that was trained: same accuracy
    assert abs(qat["accuracy"] - qat["torch_accuracy"]) <= 2 / 128
    assert qat["kept"] in ("qat", "ptq")
    if qat["kept"] == "qat":
        assert row.accuracy == pytest.approx(qat["accuracy"], abs=1e-6)
    assert details["format"] == "QDQ" and not details["float_compute_ops"]  # INT8 kernels
    assert any("quantization-aware training" in n for n in row.details["notes"])
    final = tmp_path / "model.int8.onnx"
    ort = _outputs(onnx_predictor(final, 1), val)
    vino = _outputs(openvino_predictor(openvino_model(final, 1)), val)
    assert (ort.argmax(1) == vino.argmax(1)).float().mean() >= 0.95


def test_a_missed_budget_tries_qat_before_reverting_nodes(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    model = fit(OutlierNet(), train, epochs=4).eval()
    with torch.no_grad():
        model.conv1.weight[:, 0] = 0
    model.add_outlier()  # INT8 loses most of the accuracy to one activation
    stage = cz.Int8Quantization(calibration_samples=64, fp32_placement=False, qat_epochs=1)
    result = cz.Pipeline([stage], max_accuracy_drop=0.02).run(
        model, train, val, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8,
        runtimes=["onnxruntime"],
    )  # fmt: skip
    details = result.report.row("int8_quantization", "onnxruntime").details["quantization"]
    qat, budget = details["qat"], details["accuracy_budget"]
    assert qat["ptq_accuracy"] < qat["min_accuracy"] == budget["min_accuracy"]
    assert result.budget_met is True
    if qat["met"]:
        assert not budget["fp32_nodes"]
    else:  # QAT fell short: the budget reverted nodes of the calibrated file, as before
        assert qat["kept"] == "ptq" and budget["fp32_nodes"]
        assert budget["int8_accuracy"] == pytest.approx(qat["ptq_accuracy"], abs=1e-6)


def test_qat_runs_only_when_asked_or_needed(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(n_train=64, n_val=32)
    model = fit(TinyResNet(), train, epochs=1)
    for qat, budget in (("auto", None), ("never", 0.0)):
        stage = cz.Int8Quantization(calibration_samples=16, fp32_placement=False, qat=qat)
        result = cz.Pipeline([stage], max_accuracy_drop=budget).run(
            model, train, val, output_dir=tmp_path / qat, progress=False, threads=1,
            throughput_batch=8, runtimes=["onnxruntime"],
        )  # fmt: skip
        assert "qat" not in result.report.row("int8_quantization").details["quantization"]


def test_bad_qat_options_name_what_is_allowed():
    with pytest.raises(
        RecipeError, match=r"qat must be one of 'auto', 'always', 'never' \(got: 'sometimes'\)"
    ):
        cz.Int8Quantization(qat="sometimes")
    with pytest.raises(RecipeError, match="mode 'dynamic'"):
        cz.Int8Quantization(qat="always", mode="dynamic")
    with pytest.raises(RecipeError, match="qat_epochs"):
        cz.Int8Quantization(qat_epochs=0)
    with pytest.raises(RecipeError, match="qat_optimizer"):
        cz.Int8Quantization(qat_optimizer="lion")


def test_an_op_it_cannot_compute_is_named():
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["kept"], name="nms")],
        "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, [None, 3])],
    )  # fmt: skip
    with pytest.raises(ModelError, match="NonMaxSuppression"):
        QDQModule(helper.make_model(graph))


def test_quantize_in_a_users_own_loop_can_train_the_file(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(n_train=64, n_val=32)
    model = fit(TinyResNet(), train, epochs=1)
    common = {"calibration_samples": 16, "fp32_placement": False, "threads": 1}
    ptq = cz.quantize(model, train, tmp_path / "ptq.onnx", qat="never", **common)
    qat = cz.quantize(model, train, tmp_path / "qat.onnx", qat="always", **common)
    names = {t.name for t in onnx.load(ptq).graph.initializer}
    assert names == {t.name for t in onnx.load(qat).graph.initializer}  # the same graph
    assert not torch.equal(
        _outputs(onnx_predictor(ptq, 1), val), _outputs(onnx_predictor(qat, 1), val)
    )


class CumulativeNet(nn.Module):
    """A conv net with a running sum (ONNX CumSum), an op QDQModule does not compute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc((x + 0.01 * x.cumsum(dim=3)).mean(dim=(2, 3)))

    @torch.no_grad()
    def add_outlier(self, factor: float = 1000.0) -> None:
        """Channel 0 ``factor`` times larger, the head's weights on it smaller: the same
        function in FP32, a range that leaves the other channels no INT8 resolution."""
        self.conv.weight[0] *= factor
        self.conv.bias[0] *= factor
        self.fc.weight[:, 0] /= factor


def test_a_graph_qat_cannot_train_is_named_or_skipped(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(n_train=256, n_val=64)
    model = fit(CumulativeNet(), train, epochs=3)
    model.add_outlier()
    common = {"calibration_samples": 16, "fp32_placement": False}
    with pytest.raises(ModelError, match=r"CumSum.*\(qat: never skips it\)"):
        cz.quantize(model, train, tmp_path / "always.onnx", qat="always", threads=1, **common)
    assert not (tmp_path / "always.onnx").exists()  # nothing half-written
    result = cz.Pipeline([cz.Int8Quantization(max_accuracy_drop=0.0, **common)]).run(
        model, train, val, output_dir=tmp_path / "auto", progress=False, threads=1,
        throughput_batch=8, runtimes=["onnxruntime"],
    )  # fmt: skip
    details = result.report.row("int8_quantization").details["quantization"]
    assert details["accuracy_budget"]["int8_accuracy"] < details["accuracy_budget"]["fp32_accuracy"]
    assert "CumSum" in details["qat"]["skipped"]  # calibration missed the zero budget
    assert any("quantization-aware training skipped" in n for n in result.report.notes())
