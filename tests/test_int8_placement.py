"""Nodes kept in FP32 where INT8 measures slower: the graph edit and the stage's decision."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import TinyConcatNet
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

import compressor as cz
from compressor.quantization.calibration import _CalibrationReader
from compressor.quantization.placement import MARGIN, candidates, keep_fp32
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import onnx_predictor, sample_batch
from compressor.runtime.runtimes import installed_runtimes


def _quantize(model, data, tmp_path, exclude=()):
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, torch.randn(1, 3, 16, 16), fp32, threads=1)
    out = tmp_path / f"int8_{len(exclude)}.onnx"
    reader = _CalibrationReader(cz.DataSpec(data[1]), ["input"], 64, False, 64)  # not shuffled
    quantize_static(
        str(fp32),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    return fp32, out


def test_candidates_are_thin_convs_with_their_reason(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(TinyConcatNet().eval(), torch.randn(1, 3, 16, 16), path, threads=1)
    model = onnx.load(path)
    found = candidates(model, limit=5)
    assert found[0].reason == "3 input channel(s) per group"  # the stem comes first
    assert any(c.reason.startswith(("1 input", "grouped")) for c in found[1:])  # depthwise
    assert len(candidates(model, limit=1)) == 1
    assert candidates(model, limit=0) == []


def test_keep_fp32_matches_onnx_runtimes_own_exclusion(trained_resnet, data, tmp_path):
    fp32, int8 = _quantize(trained_resnet, data, tmp_path)
    stem = candidates(onnx.load(fp32), 1)[0].node
    _, excluded = _quantize(trained_resnet, data, tmp_path, exclude=[stem])
    edited = keep_fp32(onnx.load(int8), onnx.load(fp32), [stem])
    onnx.checker.check_model(edited)
    path = tmp_path / "edited.onnx"
    onnx.save(edited, path)

    node = next(n for n in edited.graph.node if n.name == stem)
    assert node.input[0] == "input"  # reads the float input, no Quantize/Dequantize
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in edited.graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(fp32).graph.initializer}
    assert np.array_equal(weights[node.input[1]], original[node.input[1]])

    x = sample_batch(cz.DataSpec(data[1]), 32)
    ours = onnx_predictor(path, 1)(x)
    theirs = onnx_predictor(excluded, 1)(x)
    quantized = onnx_predictor(int8, 1)(x)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-4)
    assert not torch.allclose(ours, quantized, atol=1e-4)  # the stem did change


def test_keep_fp32_of_an_inner_node_keeps_the_activation_the_quantizer_clipped(data, tmp_path):
    # The quantizer drops a Relu before a Quantize whose range already clips; the float
    # tensor before that Quantize is then the conv's output without its Relu.
    from graph_patterns import PATTERNS

    torch.manual_seed(0)
    model = PATTERNS["grouped_conv"]().eval()
    fp32 = tmp_path / "fp32.onnx"
    x = torch.randn(32, 3, 32, 32)
    export_onnx(model, x[:1], fp32, threads=1)
    int8 = tmp_path / "int8.onnx"
    reader = _CalibrationReader(cz.DataSpec([(x, None)]), ["input"], 32, False, 32)
    quantize_static(str(fp32), str(int8), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    source = onnx.load(fp32)
    inner = [c.node for c in candidates(source, 5) if not c.reason.startswith("3 input")]
    edited = keep_fp32(onnx.load(int8), source, inner)
    path = tmp_path / "edited.onnx"
    onnx.save(edited, path)
    produced = {o: n.op_type for n in edited.graph.node for o in n.output}
    for node in (n for n in edited.graph.node if n.name in inner):
        assert produced[node.input[0]] == "DequantizeLinear"
    reference = onnx_predictor(fp32, 1)(x)
    error = (onnx_predictor(path, 1)(x) - reference).abs().mean()
    before = (onnx_predictor(int8, 1)(x) - reference).abs().mean()
    assert inner and error <= before * 1.1


def test_keep_fp32_refuses_a_node_that_is_not_there(trained_resnet, data, tmp_path):
    fp32, int8 = _quantize(trained_resnet, data, tmp_path)
    with pytest.raises(ValueError, match="no compute node 'nope'"):
        keep_fp32(onnx.load(int8), onnx.load(fp32), ["nope"])


def test_stage_keeps_a_node_in_fp32_only_when_measured_faster(trained_resnet, data, tmp_path):
    stage = cz.Int8Quantization(calibration_samples=64)
    result = cz.Pipeline([stage]).run(
        trained_resnet, *data, output_dir=tmp_path, progress=False, threads=1, throughput_batch=8
    )
    quant = result.report.rows[-1].details["quantization"]
    placement = quant["placement"]
    assert placement["runtimes"] == installed_runtimes()
    (tried,) = placement["tried"]  # TinyResNet has one thin conv: its RGB stem
    assert tried["reason"] == "3 input channel(s) per group"
    assert set(tried["p50_ms"]) == set(placement["runtimes"])
    before = min(t["int8"] for t in tried["p50_ms"].values())
    after = min(t["fp32"] for t in tried["p50_ms"].values())
    faster = after <= before * (1 - MARGIN)
    closer = (
        faster and tried["error_vs_fp32"]["fp32"] <= tried["error_vs_fp32"]["int8"] * 1.05 + 1e-6
    )
    kept = closer and tried["accuracy"]["fp32"] >= tried["accuracy"]["int8"]
    assert tried["kept_fp32"] == kept
    assert placement["fp32_nodes"] == ([tried["node"]] if tried["kept_fp32"] else [])
    # a node kept on purpose is named as such, not as an op that failed to quantize
    assert len(quant["fp32_by_choice"]) == len(placement["fp32_nodes"])
    assert quant["float_compute_ops"] == []
    stem_inputs = {
        n.input[0] for n in onnx.load(result.onnx_path).graph.node if n.name == tried["node"]
    }
    assert (stem_inputs == {"input"}) == tried["kept_fp32"]


def test_placement_off_leaves_every_conv_int8(trained_resnet, data, tmp_path):
    stage = dataclasses.replace(cz.Int8Quantization(calibration_samples=32), fp32_placement=False)
    result = cz.Pipeline([stage]).run(
        trained_resnet,
        *data,
        output_dir=tmp_path,
        progress=False,
        threads=1,
        throughput_batch=8,
        runtimes=["onnxruntime"],
    )
    quant = result.report.rows[-1].details["quantization"]
    assert quant["placement"] is None and quant["fp32_by_choice"] == []
    assert "placement" not in quant["seconds"]
