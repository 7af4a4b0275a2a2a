"""`--model` and `--data` sources, recipes and overrides, and the CLI's errors, in-process."""

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

import compressor as cz
from compressor.cli import main
from compressor.errors import UserError
from compressor.models.checkpoints import save_checkpoint
from compressor.pipeline.recipe import PRESETS, override_recipe, read_recipe, stages_from_recipe
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.model_specs import load_model

TESTS = Path(__file__).parent
USER_MODELS = str(TESTS / "user_models.py")
QUICK = ["--quiet", "--threads", "1", "--limit-train-batches", "2"]


def write_idx(folder: Path, prefix: str, n: int, seed: int) -> None:
    """MNIST-format IDX files (what torchvision's MNIST and FashionMNIST read)."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 10, n, dtype=np.uint8)
    images = (g.random((n, 28, 28)) * 60).astype(np.uint8)
    images[:, 4:10, :] += (labels * 19)[:, None, None].astype(np.uint8)  # learnable
    folder.mkdir(parents=True, exist_ok=True)
    header = np.array([0x803, n, 28, 28], dtype=">i4").tobytes()
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
    header = np.array([0x801, n], dtype=">i4").tobytes()
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_idx(root / "FashionMNIST" / "raw", "train", 192, 0)
    write_idx(root / "FashionMNIST" / "raw", "t10k", 64, 1)
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """imagefolder layout: train/ and val/, 4 classes of coloured 20x20 images."""
    return write_image_folder(tmp_path_factory.mktemp("images"))


# ----------------------------------------------------------------------------- sources


def test_model_sources():
    vision = load_model("torchvision:mobilenet_v3_small", num_classes=5)
    assert vision(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    from_file = load_model(f"{USER_MODELS}:build", num_classes=7)
    assert from_file(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    from_module = load_model("user_models:build_gray")  # tests/ is on sys.path
    assert from_module(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert load_model("demo", num_classes=3)(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_weights_state_dict_checkpoint_and_pickle(tmp_path):
    torch.manual_seed(0)
    source = load_model(f"{USER_MODELS}:build")
    x = torch.randn(2, 3, 16, 16)
    source.eval()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    loaded = load_model(f"{USER_MODELS}:build", weights=tmp_path / "w.pt").eval()
    assert torch.allclose(loaded(x), source(x))

    # a compressor checkpoint of a pruned model rebuilds the pruned widths
    from compressor.pruning.engine import prune
    from compressor.pruning.structured import StructuredPruning

    pruned, _ = prune(copy.deepcopy(source), x[:1], StructuredPruning(ratio=0.5, round_to=4))
    save_checkpoint(tmp_path / "ckpt.pt", pruned, step="structured_pruning", stage={}, extra={})
    rebuilt = load_model(f"{USER_MODELS}:build", weights=tmp_path / "ckpt.pt").eval()
    assert torch.allclose(rebuilt(x), pruned.eval()(x), atol=1e-6)

    # a pickled module loads only when trusted
    torch.save(load_model("user_models:build"), tmp_path / "full.pt")
    with pytest.raises(UserError, match="Pass --trust-pickle"):
        load_model(str(tmp_path / "full.pt"))
    trusted = load_model(str(tmp_path / "full.pt"), trust_pickle=True)
    assert type(trusted).__name__ == "Net"


def test_data_sources(fashion_root, image_root, tmp_path):
    train, val, info = load_data("demo")
    assert (info.channels, info.input_size, info.num_classes) == (1, 28, 10)
    assert (info.train_samples, info.val_samples) == (8000, 2000)

    train, val, info = load_data(f"fashion-mnist:{fashion_root}", DataOptions(batch_size=32))
    x, y = next(iter(train))
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64
    assert (info.train_samples, info.val_samples) == (192, 64)

    options = DataOptions(channels=3, input_size=32)
    mnist_root = tmp_path / "mnist"
    write_idx(mnist_root / "MNIST" / "raw", "train", 40, 0)
    write_idx(mnist_root / "MNIST" / "raw", "t10k", 20, 1)
    x, _ = next(iter(load_data(f"mnist:{mnist_root}", options)[0]))
    assert x.shape[1:] == (3, 32, 32)

    train, val, info = load_data(f"imagefolder:{image_root}", DataOptions(input_size=16))
    assert (info.num_classes, info.train_samples, info.val_samples) == (4, 48, 16)
    assert next(iter(val))[0].shape[1:] == (3, 16, 16)
    # one folder of class folders: a seeded validation split
    _, _, info = load_data(f"imagefolder:{image_root / 'train'}", DataOptions(val_split=0.25))
    assert (info.train_samples, info.val_samples) == (36, 12)


def test_presets_and_overrides():
    for name in PRESETS:
        assert stages_from_recipe(read_recipe(name))
    assert cz.Pipeline.from_recipe("fast").stages[0].name == "structured_pruning"
    recipe = override_recipe(read_recipe("balanced"), "epochs", 1)
    epochs = [opts["epochs"] for entry in recipe["stages"] for opts in entry.values()
              if "epochs" in opts]  # fmt: skip
    assert epochs == [1, 1]
    recipe = override_recipe(recipe, "structured_pruning.ratio", 0.25)
    assert recipe["stages"][1]["structured_pruning"]["ratio"] == 0.25


# ------------------------------------------------------------------------- CLI runs


def test_compress_own_model_on_imagefolder_with_json(image_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compress", "--model", f"{USER_MODELS}:build", "--data", f"imagefolder:{image_root}",
            "--input-size", "16", "--batch-size", "16", "--recipe", "fast", "--epochs", "1",
            "--calibration-samples", "32", "--calibration-method", "entropy",  # prints progress
            "--baseline-epochs", "1", "--output", str(out),
            "--json", *QUICK]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["onnx_path"] == str(out / "model.int8.onnx")
    assert [r["name"] for r in document["rows"]][-1] == "int8_quantization"
    assert document["rows"][0]["params"] > document["rows"][-1]["params"]
    assert (out / "report.html").is_file()


def test_compress_ctrl_c_keeps_finished_checkpoints(fashion_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compress", "--model", "user_models:interrupted", "--data",
            f"fashion-mnist:{fashion_root}", "--channels", "3", "--num-classes", "10",
            "--set", "structured_pruning.round_to=4", "--output", str(out), *QUICK]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [structured_pruning, distillation]\n")
    assert main([*argv, "--recipe", str(recipe)]) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    staged = out / ".compressor-run" / "checkpoints"
    assert [p.name for p in staged.iterdir()] == ["01_structured_pruning.pt"]
    assert not (out / "checkpoints").exists()  # nothing published by an unfinished run

    # --resume goes on after the finished pruning stage (a recipe that no longer trains)
    pruned = torch.load(staged / "01_structured_pruning.pt", weights_only=True)
    recipe.write_text("stages: [structured_pruning, int8_quantization]\n")
    assert main([*argv, "--recipe", str(recipe), "--resume", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    own = [r for r in rows if r["runtime"] != "openvino"]  # measured after the stages
    assert [r["name"] for r in own] == ["baseline"] * 2 + [
        "structured_pruning",
        "int8_quantization",
    ]
    before = [r for r in pruned["extra"]["rows"] if r["name"] == "structured_pruning"]
    assert [r for r in own if r["name"] == "structured_pruning"] == before  # loaded, not rerun


def test_installed_entry_point_runs_in_a_subprocess(fashion_root, tmp_path):
    script = Path(sys.executable).parent / "compressor"
    out = tmp_path / "run"
    done = subprocess.run(
        [
            str(script),
            "compress",
            "--model",
            f"{USER_MODELS}:build_gray",
            "--data",
            f"fashion-mnist:{fashion_root}",
            "--recipe",
            "fast",
            "--set",
            "structured_pruning.round_to=4",
            "--calibration-samples",
            "32",
            "--output",
            str(out),
            *QUICK,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "| int8_quantization | onnxruntime | int8 |" in done.stdout
    assert (out / "model.int8.onnx").is_file()


def test_debug_shows_the_traceback(capsys):
    assert main(["compress", "--model", "torchvision:resnet19", "--debug", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "did you mean resnet18" in err.splitlines()[-1]


# ------------------------------------------------------------------------ bad input


BAD = [
    ("unknown-torchvision", ["--model", "torchvision:resnet19"], "did you mean resnet18"),
    ("missing-model-file", ["--model", "missing.py:build"], "model file 'missing.py' does not exist"),
    ("no-such-factory", ["--model", "{models}:nope"], "has no callable 'nope'"),
    ("factory-raises", ["--model", "{models}:broken"], "raised ValueError: missing config 'depth'"),
    ("factory-not-module", ["--model", "{models}:not_a_model"], "returned int, not a torch.nn.Module"),
    ("module-not-found", ["--model", "no_such_pkg.nets:build"], "cannot import module 'no_such_pkg.nets'"),
    ("not-a-spec", ["--model", "resnet18"], "is neither torchvision:NAME"),
    ("pickle-untrusted", ["--model", "{pickled}"], "Pass --trust-pickle"),
    ("missing-weights", ["--model", "{models}:build_gray", "--weights", "nope.pt"], "weights file 'nope.pt' does not exist"),
    ("weights-mismatch", ["--model", "{models}:build_gray", "--weights", "{other_weights}"], "does not fit the model"),
    ("unknown-data", ["--data", "imagenet:/data"], "unknown data source 'imagenet:/data'"),
    ("data-without-dir", ["--data", "mnist"], "needs a folder: --data mnist:DIR"),
    ("missing-data-dir", ["--data", "imagefolder:/no/such/dir"], "image folder '/no/such/dir' does not exist"),
    ("gz-not-unpacked", ["--data", "fashion-mnist:{gz_root}"], "un-gzip them there"),
    ("no-dataset-files", ["--data", "mnist:{empty}"], "pass --download"),
    ("empty-class-folders", ["--data", "imagefolder:{empty_classes}"], "expected one folder per class"),
    ("channels-mismatch", ["--model", "{models}:build"], "pass --channels 3"),
    ("classes-mismatch", ["--model", "{models}:build_gray", "--num-classes", "4"], "pass --num-classes 10"),
    ("input-size-mismatch", ["--model", "{models}:fixed_size", "--data", "imagefolder:{images}"], "set --input-size"),
    ("bad-channels", ["--channels", "2"], "--channels must be 1 or 3 (got: 2)"),
    ("bad-batch-size", ["--batch-size", "0"], "--batch-size must be >= 1 (got: 0)"),
    ("unknown-preset", ["--recipe", "turbo"], "presets: fast, balanced, max-compression"),
    ("override-missing-stage", ["--recipe", "fast", "--l1", "0.1"], "no stage 'sparsity_training'"),
    ("bad-override-value", ["--ratio", "1.5"], "structured_pruning.ratio must be a number in (0.0, 1.0)"),
    ("bad-budget", ["--max-accuracy-drop", "1.5"], "max_accuracy_drop must be a fraction in [0, 1)"),
    ("bad-set", ["--set", "ratio"], "--set takes STAGE.OPTION=VALUE"),
    ("unwritable-output", ["--output", "{a_file}/run"], "cannot write to output folder"),
    ("unexportable-layer", ["--model", "{models}:spectral", "--data", "imagefolder:{images}", "--input-size", "16"], "ONNX export"),
    ("bad-threads", ["--threads", "0"], "--threads must be >= 1 (got: 0)"),
    ("bad-throughput-batch", ["--throughput-batch", "32", "0"], "--throughput-batch sizes must be >= 1"),
    ("cifar10-missing", ["--data", "cifar10:{empty}"], "cifar10 files not found"),
    ("mean-per-channel", ["--mean", "0.5", "0.5"], "--mean and --std need one value per channel, 1 (got: (0.5, 0.5)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, image_root):
    root = tmp_path_factory.mktemp("bad")
    torch.save(load_model("user_models:build"), root / "full.pt")
    torch.save(load_model(f"{USER_MODELS}:build").state_dict(), root / "other.pt")
    gz = root / "gz" / "FashionMNIST" / "raw"
    write_idx(gz, "train", 8, 0)
    for file in list(gz.iterdir()):
        (gz / f"{file.name}.gz").write_bytes(gzip.compress(file.read_bytes()))
        file.unlink()
    (root / "empty").mkdir()
    (root / "empty_classes" / "cat").mkdir(parents=True)
    (root / "a_file").write_text("x")
    return {
        "models": USER_MODELS,
        "pickled": str(root / "full.pt"),
        "other_weights": str(root / "other.pt"),
        "gz_root": str(root / "gz"),
        "empty": str(root / "empty"),
        "empty_classes": str(root / "empty_classes"),
        "images": str(image_root),
        "a_file": str(root / "a_file"),
    }


@pytest.mark.parametrize(("args", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, bad_files, tmp_path, capsys):
    args = [a.format(**bad_files) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    assert main(["compress", *args, "--quiet", "--limit-train-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
