"""The IO spec (`compressor.models.model_io`) and segmentation through the whole pipeline."""

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import compressor as cz
from compressor.cli import main
from compressor.data import DataSpec
from compressor.models.model_io import infer_output, infer_task, pick_output, resolve_io
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.segmentation_data import CLASSES, FashionCanvas
from compressor.training.loop import fit_baseline
from compressor.training.teacher import kd_loss


class TinySegNet(nn.Module):
    """An encoder-decoder that returns torchvision segmentation's ``{"out": scores}``."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(64, classes, 1)

    def forward(self, x):
        scores = self.classifier(self.encoder(x))
        size = x.shape[-2:]
        return OrderedDict(out=F.interpolate(scores, size=size, mode="bilinear"))


def canvases(samples, seed, size=32):
    from compressor.sources.demo import demo_images

    images, labels = demo_images("train" if seed == 0 else "val")
    return FashionCanvas(images, labels, samples=samples, size=size, seed=seed)


def test_outputs_are_found_in_tensors_mappings_objects_and_tuples():
    t = torch.zeros(2, 3)
    assert infer_output(t) is None
    assert infer_output({"aux": t, "out": t}) == "out"
    assert infer_output({"logits": t, "hidden": t}) == "logits"
    assert infer_output({"scores": t}) == "scores"
    assert infer_output(SimpleNamespace(logits=t, loss=None)) == "logits"
    assert infer_output((t, t)) == 0
    assert pick_output({"out": t}, "out") is t
    assert pick_output((None, t), 1) is t
    with pytest.raises(cz.ModelError, match=r"cannot find the output tensor.*keys \['boxes'\]"):
        infer_output({"boxes": [t]})
    with pytest.raises(cz.ModelError, match="has no 'out'"):
        pick_output((t,), "out")


def test_task_is_inferred_from_output_and_targets():
    assert infer_task(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)) == "classification"
    seg = torch.zeros(4, 11, 8, 8)
    assert infer_task(seg, torch.zeros(4, 8, 8, dtype=torch.long)) == "segmentation"
    assert infer_task(seg, torch.zeros(4, 7, 7, dtype=torch.long)) is None  # other size
    assert infer_task(torch.zeros(4, 10), torch.zeros(4, 10)) is None  # soft targets


def test_bad_io_options_name_the_value_and_what_is_allowed():
    with pytest.raises(cz.UserError, match="unknown task 'detect'; allowed: classification"):
        cz.ModelIO(task="detect")
    with pytest.raises(cz.UserError, match="a key, an attribute name or an index "):
        cz.ModelIO(output=1.5)
    with pytest.raises(cz.UserError, match=r"io must be a cz\.ModelIO"):
        resolve_io("out", nn.Identity(), torch.zeros(1, 3), torch.zeros(1))


def test_resolve_wraps_a_dict_output_and_picks_segmentation():
    model = TinySegNet()
    x = torch.randn(2, 1, 32, 32)
    wrapped, io = resolve_io(None, model, x, torch.zeros(2, 32, 32, dtype=torch.long))
    assert isinstance(wrapped, cz.SelectOutput) and wrapped.model is model
    assert io == cz.ModelIO(output="out", task="segmentation")
    assert io.metric == "miou"
    assert torch.equal(wrapped.eval()(x), model(x)["out"])


def test_mean_iou_matches_a_hand_count():
    # 1 image, 2x2 pixels, 3 classes; the last pixel is ignored
    scores = torch.zeros(1, 3, 2, 2)
    scores[0, 0, 0, 0] = scores[0, 1, 0, 1] = scores[0, 1, 1, 0] = scores[0, 2, 1, 1] = 1
    targets = torch.tensor([[[0, 1], [2, 255]]])  # predicted: [[0, 1], [1, 2]]
    data = DataSpec([(torch.zeros(1), targets)])
    # class 0: 1/1, class 1: hit 1 of union 2 (pixel (1,0) predicted 1, labelled 2),
    # class 2: 0 of union 1; the ignored pixel's prediction (2) counts for nothing
    expected = (1 + 0.5 + 0) / 3
    assert cz.mean_iou(lambda _x: scores, data) == pytest.approx(expected)


def test_pixel_distillation_averages_over_pixels_as_batchmean_over_samples():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    loss = kd_loss(s, t, targets, temperature=1.0, alpha=1.0, hard_loss=F.cross_entropy)
    flat_s = s.permute(0, 2, 3, 1).reshape(-1, 5)
    flat_t = t.permute(0, 2, 3, 1).reshape(-1, 5)
    flat = kd_loss(flat_s, flat_t, targets.flatten(), temperature=1.0, alpha=1.0,
                   hard_loss=F.cross_entropy)  # fmt: skip
    assert loss == pytest.approx(float(flat), rel=1e-5)


def test_ignored_layers_are_named_as_in_the_wrapped_model():
    from compressor.pruning.engine import prune

    model = cz.SelectOutput(TinySegNet(), "out").eval()
    example = torch.randn(1, 1, 32, 32)
    options = cz.StructuredPruning(ratio=0.5, round_to=8, ignored_layers=["encoder.3"])
    pruned = prune(model, example, options)[0]
    assert pruned.model.encoder[3].out_channels == 64  # left whole, named without "model."
    widths = [m.out_channels for m in pruned.model.encoder if isinstance(m, nn.Conv2d)]
    assert sum(widths) < 32 + 3 * 64  # the other layers were pruned
    assert pruned(example).shape == (1, CLASSES, 32, 32)
    with pytest.raises(cz.RecipeError, match=r"no layer 'encoder\.99'"):
        prune(model, example, cz.StructuredPruning(ignored_layers=["encoder.99"]))


def test_canvases_are_real_items_with_matching_masks_and_repeat():
    data = canvases(8, seed=0)
    image, mask = data[3]
    again, mask_again = data[3]
    assert torch.equal(image, again) and torch.equal(mask, mask_again)
    assert image.shape == (1, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert 0 < (mask > 0).float().mean() < 1 and int(mask.max()) < CLASSES
    background = image[0][mask == 0]
    foreground = image[0][mask > 0]
    assert foreground.mean() > background.mean()  # the labelled pixels are the items
    assert not torch.equal(data[0][1], data[1][1])


def test_segmentation_through_the_whole_pipeline(tmp_path):
    torch.manual_seed(0)
    train = DataLoader(canvases(1024, seed=0), batch_size=32, shuffle=True)
    val = DataLoader(canvases(64, seed=1), batch_size=32)
    model = TinySegNet()
    fit_baseline(
        model,
        train,
        epochs=4,
        lr=0.1,
        progress=False,
        loss_fn=cz.ModelIO(task="segmentation").loss_fn(),
    )
    pipeline = cz.Pipeline([
        cz.SparsityTraining(epochs=1, l1=1e-4),
        cz.StructuredPruning(ratio=0.5, round_to=8),
        cz.Distillation(epochs=2),
        cz.Int8Quantization(calibration_samples=64),
    ])  # fmt: skip
    settings = {"progress": False, "threads": 1, "throughput_batch": 8}
    result = pipeline.run(
        model, train, val, output_dir=tmp_path, runtimes=["onnxruntime"], **settings
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model_io"] == {
        "task": "segmentation", "output": "out", "metric": "miou", "ignore_index": 255,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 32, 32]}],
    }  # fmt: skip
    assert "| mIoU |" in (tmp_path / "report.md").read_text()
    rows = {(r["name"], r["runtime"]): r for r in report["rows"]}
    base = rows["baseline", "torch"]["accuracy"]
    assert base > 0.2  # it segments: all background would score about 0.06
    assert rows["baseline", "onnxruntime"]["accuracy"] == pytest.approx(base, abs=1e-3)
    pruned = rows["structured_pruning", "torch"]
    assert pruned["macs"] < 0.6 * rows["baseline", "torch"]["macs"]
    final = rows["int8_quantization", "onnxruntime"]
    distilled = rows["distillation", "torch"]["accuracy"]
    # INT8 is compared with FP32 outputs pixel by pixel, not by shape (a tiny model's
    # scores are close at many edge pixels, so agreement sits near 0.85 here)
    assert report["parity"]["top1_agreement"] > 0.8
    assert final["accuracy"] > distilled - 0.05
    assert distilled > base - 0.15
    # the compressed model keeps the wrapped model's structure and one output
    assert isinstance(result.model, cz.SelectOutput)
    assert result.model(torch.zeros(1, 1, 32, 32)).shape == (1, CLASSES, 32, 32)
    import onnx

    graph = onnx.load(result.onnx_path).graph
    assert [o.name for o in graph.output] == ["output"]


def test_cli_segments_a_torchvision_model_on_the_demo_canvases(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - structured_pruning: {ratio: 0.25}\n"
        "  - int8_quantization: {calibration_samples: 16}\n"
    )
    args = [
        "compress", "--model", "torchvision:lraspp_mobilenet_v3_large", "--num-classes", "11",
        "--data", "demo-seg", "--channels", "3", "--input-size", "32", "--batch-size", "16",
        "--baseline-epochs", "1", "--limit-train-batches", "2", "--recipe", str(recipe),
        "--threads", "1", "--throughput-batch", "4", "--runtime", "onnxruntime", "--quiet",
        "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main([*args, "--task", "segmentation"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model_io"]["task"] == "segmentation"
    assert report["model_io"]["metric"] == "miou"
    assert (tmp_path / "run" / "model.int8.onnx").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "classification"], "--task classification does not fit --data demo-seg"),
        (["--task", "detection"], "--task detection does not fit --data demo-seg"),
        (["--model", "torchvision:resnet18"], "which needs (N, classes, H, W) scores per pixel"),
        (["--input-size", "16"], "canvases are at least 28 pixels wide"),
    ],
)
def test_cli_refuses_bad_segmentation_combinations_in_one_line(extra, message, tmp_path, capsys):
    args = ["compress", "--data", "demo-seg", "--channels", "3", "--num-classes", "11",
            "--model", "torchvision:lraspp_mobilenet_v3_large", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fashion_mnist_seg_reads_the_idx_files_and_names_a_missing_folder(tmp_path):
    with pytest.raises(cz.UserError, match="does not exist"):
        load_data(f"fashion-mnist-seg:{tmp_path / 'nope'}")
    _train, val, info = load_data("demo-seg", DataOptions(input_size=40))
    assert info.task == "segmentation" and info.num_classes == CLASSES
    assert info.train_samples == 1600 and info.val_samples == 400
    images, masks = next(iter(val))
    assert images.shape[1:] == (1, 40, 40) and masks.shape[1:] == (40, 40)
