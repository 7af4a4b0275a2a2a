from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TinyResNet
from torch import nn
from torch.nn import functional as F

import compressor as cz
from compressor.quantization import int8 as quantization
from compressor.quantization.calibration import activation_bytes
from compressor.quantization.onnx_edits import pre_process
from compressor.quantization.types import choose_types
from compressor.runtime.export import check_parity, export_onnx
from compressor.runtime.measure import ort_predictor, ort_session, top1
from compressor.stage import RunContext, State


def test_export_matches_torch_and_has_a_dynamic_batch(trained_resnet, example, tmp_path):
    path = tmp_path / "m.onnx"
    batch = torch.randn(5, 3, 16, 16)
    parity = export_onnx(trained_resnet, example, path, check_inputs=batch)
    assert parity.max_abs_diff <= parity.tolerance
    assert parity.top1_agreement == 1.0 and parity.samples == 5
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    out = ort_predictor(ort_session(path, 1))(torch.randn(7, 3, 16, 16))
    assert out.shape == (7, 4)


def test_parity_mismatch_is_an_error(trained_resnet, example, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(trained_resnet, example, path)
    other = TinyResNet().eval()
    with pytest.raises(cz.ExportError, match=r"ONNX Runtime disagrees with torch.*max abs diff"):
        check_parity(other, path, torch.randn(16, 3, 16, 16))


def test_parity_compares_the_classes_labels_gives(trained_resnet, example, tmp_path):
    """A detector's classes are per anchor (`ModelIO.labels`), not argmax over axis 1."""
    path = tmp_path / "m.onnx"
    batch = torch.randn(8, 3, 16, 16)
    calls = []

    def labels(output: torch.Tensor) -> torch.Tensor:
        calls.append(output.shape)
        return torch.full(output.shape[:1], len(calls))  # torch's and ORT's never agree

    with pytest.raises(cz.ExportError, match=r"top-1 agreement 0\.000"):
        export_onnx(trained_resnet, example, path, check_inputs=batch, labels=labels)
    assert calls == [(8, 4), (8, 4)] and not path.exists()
    parity = export_onnx(trained_resnet, example, path, labels=lambda out: out.argmax(-1))
    assert parity.top1_agreement == 1.0


def test_unsupported_op_is_named_and_nothing_is_written(example, tmp_path):
    class FFTNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.fft.fft(self.conv(x)).real.mean(dim=(2, 3))

    path = tmp_path / "fft.onnx"
    with pytest.raises(cz.ExportError, match=r"aten::fft_fft"):
        export_onnx(FFTNet().eval(), example, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("machine", "features", "act", "rr"),
    [
        ("x86_64", ["avx2"], "uint8", True),
        ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "uint8", False),
        ("aarch64", ["asimddp"], "int8", False),
    ],
    ids=["x86-avx2", "x86-vnni", "arm64"],
)
def test_quantization_types_follow_the_cpu(machine, features, act, rr):
    types = choose_types(machine=machine, features=features)
    assert (types.activation_type, types.weight_type, types.reduce_range) == (act, "int8", rr)
    assert types.reason
    forced = choose_types("int8", reduce_range=False, machine=machine, features=features)
    assert (forced.activation_type, forced.reduce_range) == ("int8", False)


def test_int8_quantization_writes_a_real_int8_model(trained_resnet, data, example, tmp_path):
    ctx = RunContext(
        train_data=cz.DataSpec(data[0]), eval_data=cz.DataSpec(data[1]), output_dir=tmp_path,
        loss_fn=F.cross_entropy, eval_fn=top1, device=torch.device("cpu"), progress=False,
        step="int8_quantization",
    )  # fmt: skip
    state = State(model=trained_resnet, teacher=trained_resnet, example_input=example)
    out = cz.Int8Quantization(calibration_samples=64, fp32_placement=False).apply(state, ctx)
    assert out.onnx_path == tmp_path / "model.int8.onnx"
    ops = {n.op_type for n in onnx.load(str(out.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    q = out.details["quantization"]
    assert q["calibration_samples"] == 64
    assert q["int8_compute_ops"] >= 4  # every conv and the linear head run in INT8
    assert q["float_compute_ops"] == []
    fp32 = top1(lambda x: trained_resnet.eval()(x), ctx.eval_data)
    int8 = top1(ort_predictor(ort_session(out.onnx_path, 1)), ctx.eval_data)
    assert fp32 > 0.6
    assert int8 >= fp32 - 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_activation_bytes_sums_every_float_tensor_per_sample(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 10)
    )
    export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    # conv, relu and flatten outputs (8 x 16 x 16 each) and the 10 logits, float32
    assert activation_bytes(tmp_path / "m.onnx") == (3 * 2048 + 10) * 4


def test_calibration_in_pieces_gives_the_same_int8_model(
    trained_resnet, data, example, tmp_path, monkeypatch
):
    """Big models calibrate a few samples per run (memory); the ranges must not change."""

    def quantize(out_dir):
        # the unshuffled loader: both runs must calibrate on the same samples
        ctx = RunContext(
            train_data=cz.DataSpec(data[1]),
            eval_data=cz.DataSpec(data[1]),
            output_dir=out_dir,
            loss_fn=F.cross_entropy,
            eval_fn=top1,
            device=torch.device("cpu"),
            progress=False,
            step="int8_quantization",
        )
        state = State(model=trained_resnet, teacher=trained_resnet, example_input=example)
        # placement keeps a node FP32 by timing, which differs from run to run: off here
        stage = cz.Int8Quantization(calibration_samples=40, fp32_placement=False)
        out = stage.apply(state, ctx)
        graph = onnx.load(str(out.onnx_path)).graph
        scales = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in graph.initializer}
        return out.details["quantization"], scales

    whole, whole_scales = quantize(tmp_path / "a")
    monkeypatch.setattr(quantization, "CALIBRATION_MEMORY", 1)
    pieces, piece_scales = quantize(tmp_path / "b")
    assert whole["calibration_batch_limit"] >= 32 and pieces["calibration_batch_limit"] == 1
    assert whole["calibration_samples"] == pieces["calibration_samples"] == 40
    # the same ranges; a scale may differ in its last float32 bit (reduction order)
    assert piece_scales.keys() == whole_scales.keys()
    for name, value in whole_scales.items():
        assert np.allclose(piece_scales[name], value, rtol=1e-6, atol=0), name


def test_models_over_2gb_take_the_external_data_path(
    trained_resnet, data, example, tmp_path, monkeypatch
):
    """Over 2 GB, ONNX keeps weights beside the file; the artifact is still one file."""
    ctx = RunContext(
        train_data=cz.DataSpec(data[0]), eval_data=cz.DataSpec(data[1]), output_dir=tmp_path,
        loss_fn=F.cross_entropy, eval_fn=top1, device=torch.device("cpu"), progress=False,
        step="int8_quantization",
    )  # fmt: skip
    asked = []

    def every_file_is_big(path):
        asked.append(path)
        return True

    monkeypatch.setattr(quantization, "needs_external_data", every_file_is_big)
    state = State(model=trained_resnet, teacher=trained_resnet, example_input=example)
    out = cz.Int8Quantization(calibration_samples=32).apply(state, ctx)
    assert out.details["quantization"]["pre_process"] == "full"
    # asked once, of the export; pre-processing, quantization and the final single file
    # all follow that answer
    assert [Path(p).name for p in asked] == ["model.fp32.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]
    fp32 = top1(lambda x: trained_resnet.eval()(x), ctx.eval_data)
    assert top1(ort_predictor(ort_session(out.onnx_path, 1)), ctx.eval_data) >= fp32 - 0.05


def test_hard_sigmoid_is_split_into_ops_with_int8_kernels(tmp_path):
    # MobileNetV3's activations: HardSwish (x * HardSigmoid(x) after pre-processing) and a
    # HardSigmoid gate. ONNX Runtime has no INT8 HardSigmoid; Mul, Add and Clip quantize.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.Hardsigmoid()
    ).eval()
    x = torch.randn(16, 3, 12, 12)
    export_onnx(net, x[:1], tmp_path / "fp32.onnx")
    pre = pre_process(tmp_path / "fp32.onnx", tmp_path / "pre.onnx")
    ops = [n.op_type for n in onnx.load(str(pre)).graph.node]
    assert "HardSigmoid" not in ops and ops.count("Clip") == 2
    assert len({n.name for n in onnx.load(str(pre)).graph.node}) == len(ops)
    with torch.no_grad():
        want = net(x)
    same = ort_predictor(ort_session(pre, 1))(x)
    torch.testing.assert_close(same, want, rtol=0, atol=1e-5)  # the same function
    data = cz.DataSpec([(x, torch.zeros(16))])
    cz.Int8Quantization().quantize_file(pre, tmp_path / "int8.onnx", data, samples=16)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    arithmetic = [n for n in graph.node if n.op_type in ("Mul", "Add")]
    assert len(arithmetic) == 5 and "HardSigmoid" not in made_by.values()
    for node in arithmetic:  # every activation they read is an INT8 tensor
        assert all(made_by.get(i, "DequantizeLinear") == "DequantizeLinear" for i in node.input)
    int8 = ort_predictor(ort_session(tmp_path / "int8.onnx", 1))(x)
    assert float((int8 - want).abs().mean()) < 0.5 / 255  # under half a step of [0, 1]
