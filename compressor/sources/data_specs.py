"""Data specs, as the CLI names them: ``imagefolder:DIR``, ``fashion-mnist:DIR``, ``text:FILE``,
the embedded demos, segmentation and detection canvases.

`load_data` turns a spec string into train and eval loaders, or raises a `UserError` whose
message names the bad part and the fix. Nothing is downloaded unless asked
(``download=True``). Model specs are in `compressor.sources.model_specs`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError, UserError, first_line

DATA_KINDS = (
    "demo",
    "demo-seg",
    "imagefolder",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "fashion-mnist-seg",
    "demo-det",
    "fashion-mnist-det",
    "text",
    "text-demo",
)
SEGMENTATION_KINDS = ("demo-seg", "fashion-mnist-seg")
DETECTION_KINDS = ("demo-det", "fashion-mnist-det")
TEXT_KINDS = ("text", "text-demo")
DEMO_KINDS = ("demo", "demo-seg", "demo-det", "text-demo")  # built in: no folder
CANVASES_PER_ITEM = 0.2  # -seg and -det: canvases per Fashion-MNIST image of a split


# ---------------------------------------------------------------------------- models


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataOptions:
    """How to read a data source; ``None`` picks the source's default."""

    batch_size: int | None = None
    workers: int = 0
    input_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    download: bool = False
    val_split: float = 0.2
    seed: int = 0
    seq_len: int | None = None
    vocab_size: int = 8000
    tokenizer: str | None = None
    """Text: a Hugging Face tokenizer (folder or Hub name) instead of a word vocabulary."""


@dataclass(frozen=True)
class DataInfo:
    """What the loaders yield: input shape, classes, sizes, task (for the mismatch checks).

    Text data has ``channels`` 0, ``input_size`` the sequence length and a ``vocab_size``.
    """

    source: str
    channels: int
    input_size: int
    num_classes: int
    train_samples: int
    val_samples: int
    task: str = "classification"
    vocab_size: int | None = None

    @property
    def is_text(self) -> bool:
        """Whether the inputs are token ids and an attention mask."""
        return self.vocab_size is not None


@dataclass(frozen=True)
class _Defaults:
    channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int


_DEFAULTS = {
    "demo": _Defaults(1, 28, (0.2860,), (0.3530,), 64),
    "fashion-mnist": _Defaults(1, 28, (0.2860,), (0.3530,), 64),
    "mnist": _Defaults(1, 28, (0.1307,), (0.3081,), 64),
    "cifar10": _Defaults(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 64),
    "imagefolder": _Defaults(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32),
    "fashion-mnist-seg": _Defaults(1, 64, (0.1,), (0.25,), 32),
    "demo-seg": _Defaults(1, 64, (0.1,), (0.25,), 32),
    "fashion-mnist-det": _Defaults(3, 160, (0.0,), (1.0,), 32),
    "demo-det": _Defaults(3, 160, (0.0,), (1.0,), 32),
    "text": _Defaults(0, 128, (), (), 32),
    "text-demo": _Defaults(0, 128, (), (), 32),
}


def load_data(
    spec: str, options: DataOptions | None = None
) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Train and validation loaders for a ``--data`` spec, and what they hold.

    Specs: ``demo`` (the embedded Fashion-MNIST subset), ``fashion-mnist:DIR``, ``mnist:DIR``,
    ``cifar10:DIR`` (torchvision's layouts under DIR; ``download`` fetches them), and
    ``imagefolder:DIR`` (DIR/train and DIR/val of class folders, or one folder of class
    folders split by ``val_split``), and ``fashion-mnist-seg:DIR``: segmentation canvases
    of Fashion-MNIST items (`compressor.sources.segmentation_data`, 11 classes), 12,000 for
    training from its training split and 2,000 for validation from its test split;
    ``demo-seg`` builds 1,600 / 400 such canvases from the embedded subset.
    ``fashion-mnist-det:DIR`` and ``demo-det``: detection canvases the same way
    (`compressor.sources.detection_data`, 1-4 scaled items per canvas, boxes and 10 classes plus
    the background; targets batched by `compressor.models.detection.collate`).
    Text (`compressor.sources.text_data`; batches of ``input_ids`` and ``attention_mask``,
    ``seq_len`` tokens, default 128): ``text-demo`` (documentation of 8 standard-library
    packages, labelled by package) and ``text:DIR`` (DIR/train.tsv and DIR/val.tsv of
    ``label<TAB>text`` lines), encoded by a word vocabulary of the training text or by
    the Hugging Face ``tokenizer`` given.
    """
    options = options or DataOptions()
    kind, _, root = spec.partition(":")
    if kind not in DATA_KINDS:
        close = difflib.get_close_matches(kind, DATA_KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        kinds = [k if k in DEMO_KINDS else f"{k}:DIR" for k in DATA_KINDS]
        msg = f"unknown data source {spec!r}{hint}; allowed: {', '.join(kinds)}"
        raise UserError(msg)
    if kind not in DEMO_KINDS and not root:
        msg = f"data source {kind!r} needs a folder: --data {kind}:DIR"
        raise UserError(msg)
    _check_options(options)
    if kind in TEXT_KINDS:
        return _text_loaders(spec, kind, Path(root).expanduser(), options)
    if options.seq_len or options.tokenizer:
        msg = f"--seq-len and --tokenizer are for text data (got: --data {spec})"
        raise UserError(msg)
    defaults = _DEFAULTS[kind]
    channels = options.channels or defaults.channels
    size = options.input_size or defaults.input_size
    mean = options.mean or _per_channel(defaults.mean, channels)
    std = options.std or _per_channel(defaults.std, channels)
    if len(mean) != channels or len(std) != channels:
        msg = f"--mean and --std need one value per channel, {channels} (got: {mean}, {std})"
        raise UserError(msg)
    folder = Path(root).expanduser()
    if kind == "demo":
        train, val, num_classes = _demo_sets(channels, size)
    elif kind in SEGMENTATION_KINDS or kind in DETECTION_KINDS:
        train, val, num_classes = _canvas_sets(kind, folder, options, size, channels, mean, std)
    elif kind == "imagefolder":
        train, val, num_classes = _imagefolder_sets(folder, options, size, channels, mean, std)
    else:
        train, val, num_classes = _torchvision_sets(
            kind, folder, options, size, channels, mean, std
        )
    for split, dataset in (("training", train), ("validation", val)):
        if len(dataset) == 0:  # type: ignore[arg-type]
            msg = f"the {split} split of {spec!r} is empty"
            raise DataError(msg)
    batch = options.batch_size or defaults.batch_size
    generator = torch.Generator().manual_seed(options.seed)
    loader_args: dict[str, Any] = {
        "num_workers": options.workers,
        "persistent_workers": options.workers > 0,
    }
    if kind in DETECTION_KINDS:
        from ..models.detection import collate

        loader_args["collate_fn"] = collate
    train_loader = DataLoader(
        train, batch_size=batch, shuffle=True, generator=generator, **loader_args
    )
    val_loader = DataLoader(val, batch_size=batch, **loader_args)
    task = "classification"
    if kind in SEGMENTATION_KINDS or kind in DETECTION_KINDS:
        task = "segmentation" if kind in SEGMENTATION_KINDS else "detection"
    info = DataInfo(spec, channels, size, num_classes, len(train), len(val), task)
    return train_loader, val_loader, info


def _check_options(options: DataOptions) -> None:
    checks = (
        ("--batch-size", options.batch_size, ">= 1", lambda v: v is None or v >= 1),
        ("--workers", options.workers, ">= 0", lambda v: v >= 0),
        ("--input-size", options.input_size, ">= 8", lambda v: v is None or v >= 8),
        ("--channels", options.channels, "1 or 3", lambda v: v in (None, 1, 3)),
        ("--val-split", options.val_split, "in (0, 1)", lambda v: 0 < v < 1),
        ("--seq-len", options.seq_len, ">= 2", lambda v: v is None or v >= 2),
        ("vocab_size", options.vocab_size, "> 4", lambda v: v > 4),
    )
    for flag, value, allowed, ok in checks:
        if not ok(value):
            msg = f"{flag} must be {allowed} (got: {value})"
            raise UserError(msg)


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels


def _transforms(size: int, native: int, channels: int, native_channels: int, mean, std, train):
    from torchvision import transforms as T

    steps: list[Any] = []
    if native_channels != channels:
        steps.append(T.Grayscale(num_output_channels=channels))
    if size != native:
        steps.append(T.Resize((size, size)))
    if train and native_channels == 3:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _torchvision_sets(kind, root, options, size, channels, mean, std):
    from torchvision import datasets

    cls, native, native_channels, folder = {
        "fashion-mnist": (datasets.FashionMNIST, 28, 1, "FashionMNIST/raw"),
        "mnist": (datasets.MNIST, 28, 1, "MNIST/raw"),
        "cifar10": (datasets.CIFAR10, 32, 3, "cifar-10-batches-py"),
    }[kind]
    if not root.is_dir() and not options.download:
        msg = f"{kind} folder {str(root)!r} does not exist (pass --download to fetch it there)"
        raise UserError(msg)
    sets = []
    for train in (True, False):
        transform = _transforms(size, native, channels, native_channels, mean, std, train)
        try:
            sets.append(cls(str(root), train=train, transform=transform, download=options.download))
        except RuntimeError as exc:
            gz = sorted(p.name for p in (root / folder).glob("*.gz")) if kind != "cifar10" else []
            fix = (
                f"un-gzip them there: gunzip -k {root / folder}/*.gz"
                if gz
                else "pass --download to fetch them"
            )
            msg = f"{kind} files not found under {str(root / folder)!r} ({first_line(exc)}); {fix}"
            raise UserError(msg) from exc
        except OSError as exc:  # download failed: no network, no space
            msg = f"cannot fetch {kind} into {str(root)!r}: {first_line(exc)}"
            raise UserError(msg) from exc
    return sets[0], sets[1], len(sets[0].classes)


def _imagefolder_sets(root, options, size, channels, mean, std):
    from torchvision import datasets
    from torchvision import transforms as T

    if not root.is_dir():
        msg = f"image folder {str(root)!r} does not exist"
        raise UserError(msg)

    def transform(train: bool):
        steps: list[Any] = [T.Grayscale(num_output_channels=channels)] if channels == 1 else []
        if train:
            steps += [T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(round(size / 0.875)), T.CenterCrop(size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

    def folder(path: Path, train: bool) -> datasets.ImageFolder:
        try:
            found = datasets.ImageFolder(str(path), transform=transform(train), loader=load_image)
        except (FileNotFoundError, RuntimeError) as exc:
            msg = f"image folder {str(path)!r}: {first_line(exc)} (expected one folder per class)"
            raise DataError(msg) from exc
        if train:  # the val set is the same files or checked as "val" below
            check_images([p for p, _ in found.samples])
        return found

    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = folder(root / "train", True), folder(root / "val", False)
        if train.classes != val.classes:
            only = sorted(set(train.classes) ^ set(val.classes))
            msg = f"{str(root)!r}: train and val have different class folders (e.g. {only[:3]})"
            raise DataError(msg)
        return train, val, len(train.classes)
    full_train, full_val = folder(root, True), folder(root, False)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(options.seed))
    n_val = max(1, round(len(order) * options.val_split))
    if n_val >= len(order):
        msg = f"{str(root)!r} has {len(order)} image(s): too few to split off a validation set"
        raise DataError(msg)
    return (
        Subset(full_train, order[n_val:].tolist()),
        Subset(full_val, order[:n_val].tolist()),
        len(full_train.classes),
    )


SCAN_LIMIT = 200_000
"""Image folders up to this many files are checked for truncated files before training."""


def load_image(path: str) -> Any:
    """An image as RGB, decoded now; a file that cannot be read is a `DataError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:
        msg = f"image {path!r} cannot be read ({first_line(exc)}); remove or replace it"
        raise DataError(msg) from exc


def check_images(paths: list[str]) -> None:
    """Find truncated JPEG and PNG files before training, where that is cheap.

    Reads the last bytes of each file (a JPEG ends with its EOI marker, a PNG with its IEND
    chunk); only a file that does not is decoded whole, so valid files with trailing bytes
    pass. Folders of more than `SCAN_LIMIT` files are not scanned: a bad file is then
    named when training reaches it.
    """
    if len(paths) > SCAN_LIMIT:
        return
    endings = {(".jpg", ".jpeg"): b"\xff\xd9", (".png",): b"IEND\xaeB`\x82"}
    for path in paths:
        suffix = Path(path).suffix.lower()
        ending = next((e for names, e in endings.items() if suffix in names), None)
        if ending is None:
            continue
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 64))
                tail = f.read()
        except OSError as exc:
            msg = f"image {path!r} cannot be read ({exc.strerror or exc})"
            raise DataError(msg) from exc
        if ending not in tail:
            load_image(path).load()


class _Mapped(Dataset):
    """A dataset whose inputs pass through ``fn`` (resize or channel change, lazily)."""

    def __init__(self, base: Dataset, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[index]
        return self.fn(x), y


def _canvas_sets(kind, root, options, size, channels, mean, std):
    from . import detection_data
    from .segmentation_data import CLASSES, ITEM, FashionCanvas

    detection = kind in DETECTION_KINDS
    smallest = 2 * ITEM if detection else ITEM
    if size < smallest:
        msg = f"{kind} canvases are at least {smallest} pixels wide (got --input-size {size})"
        raise UserError(msg)
    if channels not in (1, 3) or len(set(mean)) > 1 or len(set(std)) > 1:
        msg = (
            f"{kind} canvases are gray: --channels 1 or 3 with one mean and std for all "
            f"channels (got: {channels}, {mean}, {std})"
        )
        raise UserError(msg)
    if detection and (options.mean or options.std):
        msg = (
            f"{kind} images are in [0, 1] and the detector normalises them itself: drop "
            f"--mean and --std (got: {options.mean}, {options.std})"
        )
        raise UserError(msg)
    if kind in ("demo-seg", "demo-det"):
        from .demo import demo_images

        splits = [demo_images("train"), demo_images("val")]
    else:
        items = _torchvision_sets("fashion-mnist", root, options, 28, 1, (0.0,), (1.0,))
        splits = [(items[0].data, items[0].targets), (items[1].data, items[1].targets)]
    sets = []
    for train, (images, labels) in zip((True, False), splits, strict=True):
        samples = max(1, int(len(images) * CANVASES_PER_ITEM))
        seed = options.seed * 2 + (0 if train else 1)
        if detection:
            dataset: Dataset = detection_data.FashionDetection(
                images, labels, samples=samples, size=size, channels=channels, seed=seed
            )
        else:
            dataset = FashionCanvas(
                images,
                labels,
                samples=samples,
                size=size,
                channels=channels,
                mean=mean[0],
                std=std[0],
                seed=seed,
            )
        sets.append(dataset)
    return sets[0], sets[1], detection_data.CLASSES if detection else CLASSES


def _text_loaders(
    spec: str, kind: str, root: Path, options: DataOptions
) -> tuple[DataLoader, DataLoader, DataInfo]:
    from .text_data import TextDataset, TokenizerVocab, WordVocab, read_tsv, split, stdlib_docs

    if options.channels or options.input_size or options.mean or options.std:
        msg = "--channels, --input-size, --mean and --std are for images; text takes --seq-len"
        raise UserError(msg)
    if kind == "text-demo":
        samples, classes = stdlib_docs()
        train, val = split(samples)
    else:
        files = [root / "train.tsv", root / "val.tsv"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            msg = f"--data text:DIR needs DIR/train.tsv and DIR/val.tsv; missing: {missing}"
            raise DataError(msg)
        train_rows, val_rows = read_tsv(files[0]), read_tsv(files[1])
        classes = sorted({label for _, label in train_rows})
        unknown = sorted({label for _, label in val_rows} - set(classes))
        if unknown:
            msg = f"val.tsv has labels that train.tsv lacks: {unknown[:5]}"
            raise DataError(msg)
        index = {label: i for i, label in enumerate(classes)}
        train = [(text, index[label]) for text, label in train_rows]
        val = [(text, index[label]) for text, label in val_rows]
    if options.tokenizer:
        from .hf_models import hf_tokenizer

        vocab: WordVocab | TokenizerVocab = TokenizerVocab(hf_tokenizer(options.tokenizer))
    else:
        vocab = WordVocab([text for text, _ in train], size=options.vocab_size)
    length = options.seq_len or _DEFAULTS[kind].input_size
    sets = [TextDataset(train, vocab, length), TextDataset(val, vocab, length)]
    batch = options.batch_size or _DEFAULTS[kind].batch_size
    generator = torch.Generator().manual_seed(options.seed)
    loader_args: dict[str, Any] = {
        "num_workers": options.workers,
        "persistent_workers": options.workers > 0,
    }
    if kind in DETECTION_KINDS:
        from ..models.detection import collate

        loader_args["collate_fn"] = collate
    train_loader = DataLoader(
        sets[0], batch_size=batch, shuffle=True, generator=generator, **loader_args
    )
    val_loader = DataLoader(sets[1], batch_size=batch, **loader_args)
    info = DataInfo(
        spec, 0, length, len(classes), len(train), len(val), "classification", len(vocab)
    )
    return train_loader, val_loader, info


def _demo_sets(channels: int, size: int):
    from .demo import demo_datasets

    train, val = demo_datasets()
    if channels == 1 and size == 28:
        return train, val, 10

    def adapt(x: torch.Tensor) -> torch.Tensor:
        if size != 28:
            x = nn.functional.interpolate(x[None], size=(size, size), mode="bilinear")[0]
        return x.expand(channels, -1, -1).contiguous() if channels != 1 else x

    return _Mapped(train, adapt), _Mapped(val, adapt), 10


# ----------------------------------------------------------------- model/data checks
