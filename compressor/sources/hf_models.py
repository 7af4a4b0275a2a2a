"""Hugging Face ``transformers`` models as ``--model hf:NAME`` names them.

``transformers`` is an optional extra (``pip install compressor[transformers]``), imported
only here and only when such a model is asked for.

- ``hf:bert-tiny``, ``hf:bert-mini``, ``hf:distilbert-tiny``, ``hf:vit-tiny``: small
  models built from a config, with random weights (no download);
- ``hf:path/to/config.json``: a model built from that config, random weights;
- ``hf:DIR`` or ``hf:org/name``: ``from_pretrained`` (a folder with a config and weights,
  or a Hub name, which needs the internet the first time); on text, its own tokenizer
  (`hf_tokenizer`) makes the token ids.

Text models become ``AutoModelForSequenceClassification``, image models (ViT, DeiT, ...)
``AutoModelForImageClassification``, with ``num_classes`` labels. A model built from a
config takes the data's vocabulary size (text) or channels and image size (images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError, UserError, first_line

PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": {
        "model_type": "bert",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "bert-mini": {
        "model_type": "bert",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "distilbert-tiny": {
        "model_type": "distilbert",
        "dim": 128,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dim": 512,
    },
    "vit-tiny": {
        "model_type": "vit",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "patch_size": 4,
    },
}
_ALLOWED = (
    f"give a preset ({', '.join(PRESETS)}), a config.json, a model folder, or a Hub name "
    "(which needs the internet)"
)
IMAGE_TYPES = ("vit", "deit", "beit", "dinov2", "swin", "convnext", "mobilevit", "levit")
MAX_POSITIONS = 512


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        msg = (
            "hf: models need the optional extra: pip install 'compressor[transformers]' "
            f"({first_line(exc)})"
        )
        raise UserError(msg) from exc
    return transformers


def is_image_config(config: Any) -> bool:
    """Whether a transformers config describes an image model."""
    return getattr(config, "model_type", "") in IMAGE_TYPES


def hf_config(name: str) -> Any:
    """The config ``name`` (a preset, a config.json, a folder or a Hub name) describes."""
    transformers = _transformers()
    if name in PRESETS:
        fields = dict(PRESETS[name])
        return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        msg = f"no such Hugging Face config or model folder: {str(path)!r}; {_ALLOWED}"
        raise UserError(msg)
    try:
        if path.is_file():
            return transformers.AutoConfig.from_pretrained(str(path))
        return transformers.AutoConfig.from_pretrained(str(path) if path.is_dir() else name)
    except Exception as exc:
        msg = f"cannot read the Hugging Face model {name!r}: {first_line(exc)}; {_ALLOWED}"
        raise UserError(msg) from exc


def is_pretrained(name: str) -> bool:
    """Whether ``hf:NAME`` loads pretrained weights (a folder or a Hub name), not a config."""
    return name not in PRESETS and not Path(name).expanduser().is_file()


def hf_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer in folder ``name`` or of Hub model ``name``
    (``AutoTokenizer``); it must pad, since batches are padded to one length."""
    transformers = _transformers()
    path = Path(name).expanduser()
    allowed = (
        "give --tokenizer a folder with the tokenizer's files (tokenizer.json, vocab.txt, "
        "...) or a Hub name (which needs the internet)"
    )
    if name.startswith((".", "/", "~")) and not path.exists():
        msg = f"no such tokenizer folder: {str(path)!r}; {allowed}"
        raise UserError(msg)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except Exception as exc:
        msg = f"cannot load a tokenizer from {name!r}: {first_line(exc)}; {allowed}"
        raise UserError(msg) from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 makes one
        msg = (  # from a model folder without tokenizer files: every word [UNK]
            f"cannot load a tokenizer from {name!r}: it holds no vocabulary beyond its "
            f"{len(tokenizer)} special tokens (no tokenizer files there?); {allowed}"
        )
        raise UserError(msg)
    if tokenizer.pad_token is None:
        msg = (
            f"the tokenizer {name!r} has no padding token, and text batches are padded to "
            "--seq-len; give one that pads"
        )
        raise UserError(msg)
    return tokenizer


def load_hf_model(
    name: str,
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    channels: int | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """The classifier ``hf:NAME`` names (see the module doc)."""
    transformers = _transformers()
    config = hf_config(name)
    image = is_image_config(config)
    auto = (
        transformers.AutoModelForImageClassification
        if image
        else transformers.AutoModelForSequenceClassification
    )
    path = Path(name).expanduser()
    pretrained = is_pretrained(name)
    if num_classes is not None:
        config.num_labels = num_classes
    if not pretrained:  # built from a config: it fits the data
        if image:
            config.num_channels = channels or config.num_channels
            config.image_size = image_size or config.image_size
        elif vocab_size is not None:
            config.vocab_size = vocab_size
            config.max_position_embeddings = max(config.max_position_embeddings, MAX_POSITIONS)
    try:
        if pretrained:
            return auto.from_pretrained(
                str(path) if path.is_dir() else name,
                config=config,
                ignore_mismatched_sizes=num_classes is not None,
            )
        return auto.from_config(config)
    except Exception as exc:
        msg = f"cannot build the Hugging Face model {name!r}: {first_line(exc)}"
        raise ModelError(msg) from exc
