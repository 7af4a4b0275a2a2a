"""Object detection: torchvision's SSDlite through the whole pipeline, mAP, the data."""

import dataclasses
import json
from collections import OrderedDict
from functools import partial

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor

import compressor as cz
from compressor.cli import main
from compressor.data import DataSpec
from compressor.models.detection import DetectionHead, collate, mean_ap, pad_targets
from compressor.models.model_io import resolve_io
from compressor.quantization.qdq_module import QDQModule
from compressor.runtime.export import export_onnx, nodes_of_modules, scope_module
from compressor.runtime.measure import ort_predictor, ort_session
from compressor.sources.demo import demo_images
from compressor.sources.detection_data import CLASSES, FashionDetection
from compressor.training.loop import fit_baseline

SIZE = 96


def tiny_ssdlite(size: int = SIZE, width: float = 0.25) -> SSD:
    """torchvision's SSDlite320-MobileNetV3 recipe, narrow, for ``size`` images."""
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = mobilenet_v3_large(width_mult=width, reduced_tail=True, norm_layer=norm)
    backbone = _mobilenet_extractor(backbone, 6, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    channels = det_utils.retrieve_out_channels(backbone, (size, size))
    head = SSDLiteHead(channels, anchors.num_anchors_per_location(), CLASSES, norm)
    return SSD(
        backbone,
        anchors,
        (size, size),
        CLASSES,
        head=head,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class PlainBackbone(nn.Module):
    """Two feature maps (strides 8 and 16) for torchvision's SSD, as its backbones return."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _block(3, 16, 2), _block(16, 32, 2), _block(32, 32, 1), _block(32, 64, 2)
        )
        self.down = nn.Sequential(_block(64, 64, 2), _block(64, 64, 1))

    def forward(self, x: torch.Tensor) -> OrderedDict:
        a = self.stem(x)
        return OrderedDict([("0", a), ("1", self.down(a))])


def tiny_ssd() -> SSD:
    """torchvision's SSD with its SSDHead on a small plain backbone: learns in seconds."""
    anchors = DefaultBoxGenerator([[2], [2]], min_ratio=0.3, max_ratio=0.7)
    head = SSDHead([64, 64], anchors.num_anchors_per_location(), CLASSES)
    return SSD(
        PlainBackbone(),
        anchors,
        (SIZE, SIZE),
        CLASSES,
        head=head,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def canvases(split: str, samples: int, seed: int) -> DataLoader:
    images, labels = demo_images(split)
    data = FashionDetection(images, labels, samples=samples, size=SIZE, seed=seed)
    return DataLoader(data, batch_size=32, shuffle=split == "train", collate_fn=collate)


@pytest.fixture(scope="module")
def val() -> DataLoader:
    return canvases("val", 64, seed=1)


def test_the_canvases_hold_real_boxes():
    images, labels = demo_images("val")
    data = FashionDetection(images, labels, samples=20, size=SIZE, seed=3)
    image, targets = data[5]
    again, same = data[5]
    assert torch.equal(image, again) and torch.equal(targets, same)  # drawn from the index
    assert image.shape == (3, SIZE, SIZE) and image.min() >= 0 and image.max() <= 1
    for sample in range(20):
        image, targets = data[sample]
        assert 1 <= len(targets) <= 4 and targets.shape[1] == 5
        assert ((targets[:, 0] >= 1) & (targets[:, 0] <= 10)).all()
        for _c, x1, y1, x2, y2 in targets.tolist():
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            inside = image[0, int(y1) : int(y2), int(x1) : int(x2)]
            assert inside.max() > 0.2  # the box holds the item's bright pixels
    batch_images, batch_targets = next(iter(DataLoader(data, batch_size=8, collate_fn=collate)))
    assert batch_images.shape == (8, 3, SIZE, SIZE)
    assert batch_targets.shape[0] == 8 and batch_targets.shape[2] == 5
    assert (batch_targets[..., 0] == -1).any()  # padding rows


def test_pad_targets_and_its_errors():
    targets = pad_targets(
        [torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4)], [torch.tensor([3]), torch.zeros(0)]
    )
    assert targets.tolist() == [[[3, 1, 2, 3, 4]], [[-1, 0, 0, 0, 0]]]
    with pytest.raises(cz.UserError, match="objects=1 is fewer"):
        pad_targets([torch.zeros(2, 4)], [torch.zeros(2)], objects=1)


def _oracle(head: DetectionHead, targets: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """The dense output that encodes ``targets`` exactly (boxes moved by ``shift`` px)."""
    from compressor.models.detection import _box_coder, _match, _objects

    out = torch.zeros(len(targets), len(head.anchors), 4 + CLASSES)
    out[..., 4] = 8.0  # background everywhere
    coder = _box_coder(head.box_weights)
    for i, (classes, boxes) in enumerate(_objects(targets)):
        matched = _match(boxes, head.anchors, head.iou_threshold)
        fg = torch.where(matched >= 0)[0]
        out[i, fg, :4] = coder.encode_single(boxes[matched[fg]] + shift, head.anchors[fg])
        out[i, fg, 4] = 0.0
        out[i, fg, 4 + classes[matched[fg]]] = 8.0
    return out


def test_mean_ap_of_exact_boxes_is_one_and_falls_as_they_move(val):
    _, io = resolve_io(None, tiny_ssdlite(), *next(iter(val)))
    head = io.detection
    table = {float(x.sum()): t for x, t in val}
    data = DataSpec(val)

    def shifted(by):
        return lambda x: _oracle(head, table[float(x.sum())], shift=by)

    exact, moved = mean_ap(shifted(0.0), data, head=head), mean_ap(shifted(4.0), data, head=head)
    assert exact > 0.97
    assert moved < exact - 0.2  # 4 px off: the stricter IoU thresholds miss
    # the loss of the exact encoding is far below that of the moved one
    _, t = next(iter(val))
    assert float(head.loss(_oracle(head, t), t)) < float(head.loss(_oracle(head, t, 4.0), t))


def test_scope_names_map_back_to_modules(tmp_path):
    assert scope_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    name = "/head/classification_head/module_list.0/module_list.0.1/Conv"
    assert scope_module(name) == "head.classification_head.module_list.0.1"
    assert scope_module("/Concat") == "" and scope_module("Conv_0") == ""
    dense, io = resolve_io(None, tiny_ssdlite(), torch.rand(2, 3, SIZE, SIZE), None)
    export_onnx(dense.eval(), torch.rand(1, 3, SIZE, SIZE), tmp_path / "m.onnx")
    found = nodes_of_modules(onnx.load(str(tmp_path / "m.onnx")), io.detection.keep_fp32)
    assert len(found) == 12 and all(n.endswith("/Conv") for n in found)


@pytest.mark.parametrize("build", [tiny_ssdlite, tiny_ssd])
def test_the_dense_ssd_scores_as_torchvision_with_one_reshape_per_head(tmp_path, build):
    torch.manual_seed(0)
    detector = build().eval()
    dense, _ = resolve_io(None, detector, torch.rand(2, 3, SIZE, SIZE), None)
    dense.eval()
    assert dense.state_dict().keys() == {  # the same names as torchvision's
        k for k in detector.state_dict() if k.startswith(("backbone.", "head."))
    } | {"mean", "std"}
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        features = list(detector.backbone((x - dense.mean) / dense.std).values())
        out = detector.head(features)  # torchvision's own view per feature map
        expected = torch.cat([out["bbox_regression"], out["cls_logits"]], dim=-1)
        assert torch.equal(dense(x), expected)
    export_onnx(dense, x[:1], tmp_path / "m.onnx", check_inputs=x)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    # the batch size read once per head, not each map's sizes per map
    assert ops.count("Shape") == 2 and ops.count("Reshape") == 2


def test_a_detector_through_all_four_stages(tmp_path, val, monkeypatch):
    torch.manual_seed(0)
    detector = tiny_ssd()
    train = canvases("train", 320, seed=0)
    dense, io = resolve_io(None, detector, *next(iter(train)))
    fit_baseline(dense, train, epochs=8, lr=0.05, loss_fn=io.loss_fn(), progress=False)
    heads_before = {
        n: m.out_channels for n, m in dense.named_modules() if n in io.detection.keep_fp32
    }
    pipeline = cz.Pipeline(
        [
            cz.SparsityTraining(epochs=1),
            cz.StructuredPruning(ratio=0.3),
            cz.Distillation(epochs=2),
            cz.Int8Quantization(calibration_samples=64, fp32_placement=False),
        ]
    )
    result = pipeline.run(
        detector,
        train,
        val,
        output_dir=tmp_path / "out",
        runtimes=["onnxruntime"],
        progress=False,
        throughput_batch=4,
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_io"]["task"] == "detection" and report["model_io"]["metric"] == "map"
    assert report["model_io"]["detection"]["anchors"] == len(io.detection.anchors)
    rows = {(r["name"], r["runtime"]): r for r in report["rows"]}
    base = rows[("baseline", "onnxruntime")]
    final = rows[("int8_quantization", "onnxruntime")]
    assert final["params"] < 0.85 * base["params"] and final["macs"] < base["macs"]
    # the heads' last layers: whole after pruning, FP32 in the INT8 file
    heads_after = {n: m.out_channels for n, m in result.model.named_modules() if n in heads_before}
    assert heads_after == heads_before
    quantization = final["details"]["quantization"]
    kept = quantization["fp32_by_choice"]
    assert len(kept) == 4 and all(k.startswith("/head/") for k in kept)
    assert quantization["int8_compute_ops"] >= 6
    budget = quantization["accuracy_budget"]  # a detector's own, by default
    assert budget["min_accuracy"] == pytest.approx(budget["fp32_accuracy"] - 0.015, abs=1e-6)
    assert budget["met"]
    # INT8 against the compressed FP32 model: the same classes per anchor, the same mAP
    distilled = rows[("distillation", "torch")]["accuracy"]
    assert base["accuracy"] > 0.01, "the baseline found nothing: the check means nothing"
    assert abs(final["accuracy"] - distilled) < 0.02
    assert report["parity"]["top1_agreement"] > 0.97
    # the ONNX file ends before post-processing: (N, anchors, 4 + classes)
    x, _ = next(iter(val))
    out = ort_predictor(ort_session(tmp_path / "out" / "model.int8.onnx", 1))(x[:2])
    assert out.shape == (2, len(io.detection.anchors), 4 + CLASSES)
    found = io.detection.detections(out)
    assert set(found[0]) == {"boxes", "scores", "labels"}
    # quantization-aware training can train this file: its graph (the heads' FP32 convs,
    # the reshapes, the concatenation) computes in torch as ONNX Runtime runs it
    ours = QDQModule(onnx.load(tmp_path / "out" / "model.int8.onnx"))(x[:2]).detach()
    assert (ours - out).abs().mean() <= 0.05 * out.abs().mean()
    # the folder holds what decodes the file's output: the same boxes from the saved head
    saved = DetectionHead.load(tmp_path / "out" / "detection_head.json")
    assert saved == dataclasses.replace(io.detection, anchors=saved.anchors)
    assert torch.equal(saved.anchors, io.detection.anchors)
    for a, b in zip(saved.detections(out), found, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    # and the report's deployment lines run there: the file, then the saved head
    runtime, code = result.report.deployment()
    assert runtime == "onnxruntime"
    monkeypatch.chdir(tmp_path / "out")
    scope = {"batch": x[:2].numpy()}
    exec(code, scope)
    np.testing.assert_allclose(scope["outputs"], out.numpy(), rtol=0, atol=1e-5)
    assert [len(d["boxes"]) for d in scope["boxes"]] == [len(d["boxes"]) for d in found]


def test_a_saved_head_round_trips_and_a_bad_file_is_named(tmp_path):
    _, io = resolve_io(None, tiny_ssdlite(), torch.rand(2, 3, SIZE, SIZE), None)
    path = tmp_path / "head.json"
    io.detection.save(path)
    saved = DetectionHead.load(path)
    assert torch.equal(saved.anchors, io.detection.anchors) and saved.keep_fp32
    assert saved == dataclasses.replace(io.detection, anchors=saved.anchors)
    path.write_text('{"format": "compressor.detection_head/1", "anchors": [[0, 0, 1]]}')
    with pytest.raises(cz.UserError, match="needs anchors and image_size"):
        DetectionHead.load(path)
    path.write_text('{"anchors": []}')
    with pytest.raises(cz.UserError, match="is not a detection head file"):
        DetectionHead.load(path)


def test_cli_compresses_a_detector_and_refuses_bad_combinations(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compress", "--model", "torchvision:ssdlite320_mobilenet_v3_large",
            "--data", "demo-det", "--input-size", "64", "--baseline-epochs", "1",
            "--limit-train-batches", "2", "--set", "sparsity_training.epochs=1",
            "--set", "distillation.epochs=1", "--set", "int8_quantization.fp32_placement=false",
            "--calibration-samples", "16", "--runtime", "onnxruntime", "--threads", "1",
            "--throughput-batch", "4",
            "--output", str(out), "--quiet", "--json",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["model_io"]["task"] == "detection"
    assert (out / "model.int8.onnx").is_file()
    capsys.readouterr()
    bad = [
        (["--data", "demo-det", "--model", "demo"], "needs a detector compressor knows"),
        (["--data", "demo", "--task", "detection"], "--task detection does not fit --data demo"),
        (["--data", "demo-det", "--mean", "0.5", "0.5", "0.5"], "drop --mean and --std"),
        (["--data", "demo-det", "--input-size", "40"], "at least 56 pixels"),
        (["--data", "demo-det", "--model", "torchvision:fcos_resnet50"], "detectors: ssdlite"),
    ]
    for args, message in bad:
        model = (
            [] if "--model" in args else ["--model", "torchvision:ssdlite320_mobilenet_v3_large"]
        )
        code = main(["compress", *model, *args, "--output", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
