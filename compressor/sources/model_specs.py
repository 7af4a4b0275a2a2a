"""Model specs: --model torchvision:NAME, hf:NAME, FILE.py:factory, package.module:factory,
a checkpoint with a factory, or a pickled model (only when the user trusts it); and what a
spec says of the model before it is loaded."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError, first_line
from ..models.checkpoints import load_checkpoint

DETECTORS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16")  # torchvision's, supported


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    in_channels: int = 1,
    input_size: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """The model a ``--model`` spec names, with ``weights`` loaded into it when given.

    Specs: ``demo`` (`DemoResNet`, untrained), ``torchvision:NAME`` (random weights),
    ``hf:NAME`` (a Hugging Face classifier, see `compressor.sources.hf_models`; built from a config
    it takes ``vocab_size`` for text, ``in_channels`` and ``input_size`` for images),
    ``path/to/file.py:factory``,
    ``package.module:factory`` (a callable returning an ``nn.Module``; it gets
    ``num_classes`` when it takes that argument), or a file holding a pickled module
    (only with ``trust_pickle``, as unpickling runs code from the file).
    ``weights``: a state_dict file, a dict holding one under ``state_dict`` or ``model``, or
    a compressor checkpoint (``checkpoints/NN_step.pt``, pruned widths included).
    """
    source, sep, factory = spec.rpartition(":")
    if spec == "demo":
        from .demo import DemoResNet

        model: nn.Module = DemoResNet(num_classes=num_classes or 10, in_channels=in_channels)
    elif spec.startswith("torchvision:"):
        model = _torchvision_model(spec.removeprefix("torchvision:"), num_classes)
    elif spec.startswith("hf:"):
        from .hf_models import load_hf_model

        model = load_hf_model(
            spec.removeprefix("hf:"),
            num_classes=num_classes,
            vocab_size=vocab_size,
            channels=in_channels,
            image_size=input_size,
        )
    elif sep and source and factory.isidentifier():  # "C:" of a Windows path is no factory
        model = _call_factory(source, factory, num_classes)
    else:
        model = _pickled_model(Path(spec).expanduser(), trust_pickle)
    if weights is not None:
        model = _load_weights(model, Path(weights).expanduser(), trust_pickle)
    return model


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    names = [*torchvision.models.list_models(module=torchvision.models), *segmentation]
    if name not in names + list(DETECTORS):
        close = difflib.get_close_matches(name, names + list(DETECTORS), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models"
        msg = (
            f"unknown torchvision classification, segmentation or detection model {name!r} "
            f"(detectors: {', '.join(DETECTORS)}): {hint}"
        )
        raise UserError(msg)
    kwargs: dict[str, Any] = {"weights": None}
    if name in segmentation:  # no download: random backbone, no auxiliary head
        kwargs.update(weights_backbone=None, aux_loss=False)
    if name in DETECTORS:
        kwargs.update(weights_backbone=None)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith(("googlenet", "inception")):
        kwargs["aux_logits"] = False  # auxiliary heads only train, and exports skip them
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)


def _import_source(source: str) -> Any:
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            msg = f"model file {source!r} does not exist"
            raise UserError(msg)
        module_name = f"compressor_user_{path.stem}"
        loaded = sys.modules.get(module_name)
        if loaded is not None and Path(getattr(loaded, "__file__", "")) == path:
            return loaded  # import a file once, so its classes stay the same objects
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            msg = f"cannot import {source!r} as a Python file"
            raise UserError(msg)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            msg = f"importing {source!r} failed: {type(exc).__name__}: {first_line(exc)}"
            raise UserError(msg) from exc
        return module
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        msg = (
            f"cannot import module {source!r} ({first_line(exc)}); give an importable "
            "package.module:factory or path/to/file.py:factory"
        )
        raise UserError(msg) from exc


def _call_factory(source: str, factory_name: str, num_classes: int | None) -> nn.Module:
    module = _import_source(source)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        msg = f"{source!r} has no callable {factory_name!r} (found: {', '.join(found[:8])})"
        raise UserError(msg)
    kwargs = {}
    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:
        msg = (
            f"model factory {source}:{factory_name} raised {type(exc).__name__}: {first_line(exc)}"
        )
        raise UserError(msg) from exc
    if not isinstance(model, nn.Module):
        msg = (
            f"model factory {source}:{factory_name} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
        raise UserError(msg)
    return model


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _read(path: Path, trust_pickle: bool, what: str) -> Any:
    if not path.is_file():
        msg = f"{what} {str(path)!r} does not exist"
        raise UserError(msg)
    with path.open("rb") as f:
        head = f.read(2)
    if not (head == b"PK" or head[:1] == b"\x80"):  # a zip (torch.save) or a pickle
        msg = f"{what} {str(path)!r} is not a file torch.save wrote (it starts with {head!r})"
        raise UserError(msg)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if not trust_pickle and "weights_only" in str(exc):
            msg = (
                f"{what} {str(path)!r} holds pickled Python objects; loading it runs code from "
                "the file. Pass --trust-pickle if you trust it, or save a state_dict instead"
            )
            raise UserError(msg) from exc
        msg = (
            f"cannot read {what} {str(path)!r}: it is not a file torch.save wrote, or it is "
            f"truncated ({first_line(exc)})"
        )
        raise UserError(msg) from exc


def _pickled_model(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.exists():
        msg = (
            f"model {str(path)!r} is neither torchvision:NAME, file.py:factory, "
            "package.module:factory nor an existing file"
        )
        raise UserError(msg)
    loaded = _read(path, trust_pickle, "model file")
    if not isinstance(loaded, nn.Module):
        msg = (
            f"model file {str(path)!r} holds a {type(loaded).__name__}, not a module; for a "
            "state_dict give the model as a factory and the file as --weights"
        )
        raise UserError(msg)
    return loaded


def _load_weights(model: nn.Module, path: Path, trust_pickle: bool) -> nn.Module:
    loaded = _read(path, trust_pickle, "weights file")
    if isinstance(loaded, dict) and {"state_dict", "widths"} <= set(loaded):
        try:
            return load_checkpoint(path, model)[0]
        except (KeyError, RuntimeError) as exc:
            msg = f"checkpoint {str(path)!r} does not fit this model: {first_line(exc)}"
            raise UserError(msg) from exc
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        msg = f"weights file {str(path)!r} holds no state_dict (got: {type(loaded).__name__})"
        raise UserError(msg)
    loaded = {k.removeprefix("module."): v for k, v in loaded.items()}  # saved from DDP
    try:
        model.load_state_dict(loaded)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        msg = f"weights file {str(path)!r} does not fit the model: {'; '.join(lines)[:400]}"
        raise UserError(msg) from exc
    return model


@dataclass(frozen=True)
class ModelSource:
    """What a ``--model`` spec says of the model before it is loaded.

    Attributes:
        spec: the spec as given.
        sized_to_data: its output layer is built for the data's classes (the demo, ``hf:``).
        random_weights: an architecture without trained weights unless ``--weights`` gives
            them (``torchvision:``, an ``hf:`` config); its accuracy means nothing untrained.
        baseline_epochs: the epochs it is trained for before compressing when the user asks
            for none (3 for the untrained demo model, else 0).
    """

    spec: str
    sized_to_data: bool
    random_weights: bool
    baseline_epochs: int


def model_source(spec: str, weights: str | Path | None = None) -> ModelSource:
    """The facts of `ModelSource` for ``spec`` (with ``weights``, when given)."""
    demo = spec == "demo"
    hf = spec.startswith("hf:")
    return ModelSource(
        spec=spec,
        sized_to_data=demo or hf,
        random_weights=weights is None and (spec.startswith("torchvision:") or _hf_config(spec)),
        baseline_epochs=3 if demo and weights is None else 0,
    )


def _hf_config(spec: str) -> bool:
    """Whether ``spec`` is an hf: model built from a config (random weights)."""
    if not spec.startswith("hf:"):
        return False
    from .hf_models import is_pretrained

    return not is_pretrained(spec.removeprefix("hf:"))


def text_tokenizer(model: str, data: str, tokenizer: str | None) -> str | None:
    """The tokenizer text data is encoded with: ``tokenizer``, else a pretrained hf: model's
    own (its ids mean nothing in a word vocabulary's numbering), else None (the data's word
    vocabulary)."""
    from .data_specs import TEXT_KINDS
    from .hf_models import is_pretrained

    text = data.partition(":")[0] in TEXT_KINDS
    if tokenizer or not text or not model.startswith("hf:"):
        return tokenizer
    name = model.removeprefix("hf:")
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        return None  # loading the model names the missing folder
    return name if is_pretrained(name) else None
