"""One checkpoint file per finished stage, loadable with ``weights_only=True``.

A pruned model has other tensor shapes than the model it came from, so a plain
state_dict cannot be loaded into a fresh copy. Beside the state_dict we store every plain
attribute of every module (numbers, flags, tuples of numbers: widths, head counts, group
counts, a ViT's ``hidden_dim``), whichever stage changed them, and the blocks an adapter
restructured; `load_checkpoint` applies all of it to a copy of the original model, so no
pickled module is ever needed.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path
from ..errors import UserError, first_line
from .adapters import after_pruning, restructure_named, restructured

FORMAT = 1


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's own attributes that are numbers, flags or lists of numbers."""
    found: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name == "training" or (name.startswith("_") and name != "_qkv_same_embed_dim"):
            continue
        if isinstance(value, (bool, int, float)):
            found[name] = value
        elif (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(v, (bool, int, float)) for v in value)
        ):
            found[name] = list(value)
    return found


def model_payload(model: nn.Module) -> dict[str, Any]:
    """``model``'s weights, layer widths and restructured blocks: tensors and plain values only.

    `rebuild` turns it back into the model from a copy of the original; checkpoints store
    it, and rank 0 of a data-parallel run sends it to the other ranks.
    """
    widths: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = plain_attributes(module)
        if attrs:
            widths[name] = attrs
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "widths": widths,
        "restructured": restructured(model),
    }


def rebuild(payload: dict[str, Any], template: nn.Module) -> nn.Module:
    """The model of a `model_payload`, rebuilt from a copy of ``template`` (the original)."""
    model = copy.deepcopy(template)
    restructure_named(model, payload.get("restructured", {}))
    modules = dict(model.named_modules())
    for name, attrs in payload["widths"].items():
        module = modules[name]
        for attr, value in attrs.items():
            if isinstance(value, list):  # restored as the type the template has
                value = (
                    list(value) if isinstance(getattr(module, attr, None), list) else tuple(value)
                )
            setattr(module, attr, value)
    state = payload["state_dict"]
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        current = getattr(owner, leaf)
        if isinstance(current, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(tensor.clone(), requires_grad=current.requires_grad))
        elif isinstance(current, torch.Tensor):
            owner.register_buffer(leaf, tensor.clone())
    model.load_state_dict(state)
    after_pruning(model)  # adapters' fix-ups that follow from the restored widths
    return model


def save_checkpoint(
    path: str | Path, model: nn.Module, *, step: str, stage: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Write ``model``'s weights and layer widths, the stage's options and ``extra``."""
    payload = {
        "format": FORMAT,
        "step": step,
        "stage": stage,
        **model_payload(model),
        "extra": extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, template: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the checkpointed model from a copy of ``template`` (the original model).

    Returns the model and the checkpoint's payload (step, stage options, extra).
    """
    payload = read_checkpoint(path)
    return rebuild(payload, template), payload


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's payload (step, stage options, extra), its tensors memory-mapped.

    Raises:
        UserError: the file is truncated or is not a compressor checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        msg = (
            f"checkpoint {str(path)!r} cannot be read: it is truncated or not a compressor "
            f"checkpoint ({first_line(exc)})"
        )
        raise UserError(msg) from exc
    if not isinstance(payload, dict) or not {"state_dict", "widths"} <= set(payload):
        msg = f"{str(path)!r} is not a compressor checkpoint (no state_dict and widths)"
        raise UserError(msg)
    return payload


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
