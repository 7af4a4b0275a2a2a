"""Checks before a run: that a model runs on its data's inputs and answers in the shape its
task needs, and that image files open."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ModelError, first_line
from ..inputs import call
from .model_specs import DETECTORS

if TYPE_CHECKING:
    from .data_specs import DataInfo


def _run_on_text(model: nn.Module, info: DataInfo) -> Any:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if isinstance(embeddings, nn.Embedding) and embeddings.num_embeddings < info.vocab_size:
        msg = (
            f"the model's vocabulary has {embeddings.num_embeddings} tokens, the data's "
            f"{info.vocab_size}: build the model from a config (hf:NAME_OR_CONFIG) so it "
            "takes the data's vocabulary"
        )
        raise ModelError(msg)
    example = {
        "input_ids": torch.zeros(2, info.input_size, dtype=torch.long),
        "attention_mask": torch.ones(2, info.input_size, dtype=torch.long),
    }
    return _forward(
        model,
        example,
        f"token ids and an attention mask of {info.input_size} tokens",
        "--data text needs a text model such as hf:bert-tiny; --seq-len sets the length",
    )


def _run_on_images(model: nn.Module, info: DataInfo) -> Any:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
    if isinstance(first, nn.Conv2d) and first.in_channels != info.channels:
        msg = (
            f"the model's first conv takes {first.in_channels} input channel(s), the data has "
            f"{info.channels}: pass --channels {first.in_channels}"
        )
        raise ModelError(msg)
    example = torch.zeros(2, info.channels, info.input_size, info.input_size)
    return _forward(
        model,
        example,
        f"{info.channels}x{info.input_size}x{info.input_size} inputs",
        "set --input-size to the size it was built for",
    )


def _check_detector(model: nn.Module, info: DataInfo) -> None:
    from ..models.adapters import dense_detector

    example = torch.zeros(2, info.channels, info.input_size, info.input_size)
    found = dense_detector(model, example)
    if found is None:
        msg = (
            f"{info.source} is a detection data set, which needs a detector compressor knows "
            f"(--model torchvision:{' or torchvision:'.join(DETECTORS)}); got "
            f"{type(model).__name__}"
        )
        raise ModelError(msg)
    dense, _head = found
    out = _forward(
        dense,
        example,
        f"{info.channels}x{info.input_size}x{info.input_size} inputs",
        "set --input-size to one its feature maps fit",
    )
    classes = out.shape[-1] - 4
    if classes != info.num_classes:
        msg = (
            f"the detector scores {classes} classes, the data has {info.num_classes} "
            f"(background included): pass --num-classes {info.num_classes}"
        )
        raise ModelError(msg)


def _forward(model: nn.Module, example: Any, what: str, fix: str) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call(model, example)
    except Exception as exc:
        msg = f"the model cannot run on {what} ({type(exc).__name__}: {first_line(exc)}); {fix}"
        raise ModelError(msg) from exc
    finally:
        model.train(was_training)


def check_model_fits_data(model: nn.Module, info: DataInfo) -> None:
    """Catch channel, input-size, vocabulary and class-count mismatches before any training.

    Raises:
        ModelError: naming what differs and the flag that fixes it.
    """
    if info.task == "detection":
        _check_detector(model, info)
        return
    out = _run_on_text(model, info) if info.is_text else _run_on_images(model, info)
    from ..models.model_io import logits_of

    logits = logits_of(out)
    dims = 4 if info.task == "segmentation" else 2
    if logits.dim() != dims:
        what = "(N, classes, H, W) scores per pixel" if dims == 4 else "(N, classes) logits"
        msg = (
            f"{info.source} is a {info.task} data set, which needs {what}; the model "
            f"outputs shape {tuple(logits.shape)}"
        )
        raise ModelError(msg)
    classes = logits.shape[1]
    if classes != info.num_classes:
        msg = (
            f"the model outputs {classes} classes, the data has {info.num_classes}: "
            f"pass --num-classes {info.num_classes} (the head is then new and needs training)"
        )
        raise ModelError(msg)
