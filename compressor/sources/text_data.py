"""A text classification task that builds offline, and the word vocabulary that encodes it.

`stdlib_docs`: which package of Python's standard library a piece of documentation comes
from. Every docstring (module, class, function) and every block of ``#`` comments of at
least `MIN_WORDS` words in the sources of `PACKAGES` is one sample, labelled with its
package (8 classes). The text is real English prose written by people, about networking,
mail, testing, XML, logging, processes, imports and event loops, and it is on every machine
that has Python. The samples depend on the Python version a little (the standard library
changes between versions); for one version they are the same everywhere. One sample in five
(chosen by a hash of the text) is validation.

`WordVocab` turns text into ``input_ids`` and ``attention_mask`` as a BERT-style model reads
them (``[CLS] words [SEP]`` padded to a fixed length); `TextDataset` yields
``({"input_ids": ..., "attention_mask": ...}, label)``, which a DataLoader batches into the
named inputs `compressor.inputs` describes.

`read_tsv` reads a user's own task from ``label<TAB>text`` lines.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError

PACKAGES = (
    "asyncio",
    "email",
    "unittest",
    "xml",
    "http",
    "logging",
    "multiprocessing",
    "importlib",
)
MIN_WORDS = 5
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD, UNK, CLS, SEP = range(len(SPECIALS))
_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_COMMENT = re.compile(r"^\s*#+\s?(.*)$")


def stdlib_docs(root: str | Path | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(text, label)`` samples of the standard-library task, and the class names.

    Raises:
        DataError: the standard library's sources are not there (a Python built without
            them).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    samples: dict[str, int] = {}
    for label, package in enumerate(PACKAGES):
        folder = root / package
        files = sorted(p for p in folder.rglob("*.py") if "test" not in p.relative_to(root).parts)
        for path in files:
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for text in _documentation(source):
                samples.setdefault(text, label)  # a text in two packages keeps its first
    counts = collections.Counter(samples.values())
    if len(counts) < len(PACKAGES):
        missing = [p for i, p in enumerate(PACKAGES) if not counts[i]]
        msg = f"the standard library's sources under {root} lack the packages {missing}"
        raise DataError(msg)
    return sorted(samples.items()), list(PACKAGES)


def _documentation(source: str) -> Iterable[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= MIN_WORDS:
                yield " ".join(doc.split())
    block: list[str] = []
    for line in [*source.splitlines(), ""]:
        match = _COMMENT.match(line)
        if match and not line.lstrip().startswith("#!"):
            block.append(match.group(1))
            continue
        text = " ".join(" ".join(block).split())
        if len(text.split()) >= MIN_WORDS:
            yield text
        block = []


def is_validation(text: str) -> bool:
    """One sample in five, fixed by the text itself."""
    return hashlib.sha256(text.encode()).digest()[0] % 5 == 0


def split(samples: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list]:
    """The training and validation samples (see `is_validation`)."""
    train = [s for s in samples if not is_validation(s[0])]
    val = [s for s in samples if is_validation(s[0])]
    return train, val


def words(text: str) -> list[str]:
    """Lower-cased words, numbers and punctuation marks."""
    return _WORD.findall(text.lower())


class WordVocab:
    """Word-level ids for text: the ``size - 4`` most frequent words of the training text
    (ties in alphabetical order) after ``[PAD] [UNK] [CLS] [SEP]``."""

    def __init__(self, texts: Iterable[str], size: int = 8000) -> None:
        if size <= len(SPECIALS):
            msg = f"the vocabulary size must exceed {len(SPECIALS)} (got: {size})"
            raise DataError(msg)
        counts = collections.Counter(w for t in texts for w in words(t))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: size - len(SPECIALS)]
        self.tokens = [*SPECIALS, *ranked]
        self.ids = {w: i for i, w in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``[CLS] text [SEP]``, cut or padded to
        ``length``."""
        ids = [*[CLS, *(self.ids.get(w, UNK) for w in words(text))][: length - 1], SEP]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        ids += [PAD] * (length - len(ids))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


class TokenizerVocab:
    """A Hugging Face tokenizer in `WordVocab`'s place: the ids the model was trained on,
    with the tokenizer's own special tokens, cut or padded to ``length``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``text``, ``length`` tokens."""
        found = self.tokenizer(
            text, max_length=length, truncation=True, padding="max_length", return_tensors="pt"
        )
        return found["input_ids"][0].long(), found["attention_mask"][0].long()


class TextDataset(Dataset):
    """``({"input_ids": (length,), "attention_mask": (length,)}, label)`` per sample,
    encoded by ``vocab`` (a `WordVocab` or a `TokenizerVocab`)."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], vocab: WordVocab | TokenizerVocab, length: int
    ) -> None:
        if length < 2:
            msg = f"the sequence length must be at least 2 (got: {length})"
            raise DataError(msg)
        self.samples = list(samples)
        self.vocab = vocab
        self.length = length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        text, label = self.samples[index]
        ids, mask = self.vocab.encode(text, self.length)
        return {"input_ids": ids, "attention_mask": mask}, label


def read_tsv(path: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` from the ``label<TAB>text`` lines of ``path`` (blank lines skipped).

    Raises:
        DataError: the file is missing, or a line has no tab (naming the line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read the text data {str(path)!r}: {exc}"
        raise DataError(msg) from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            msg = f"{path.name} line {number} is not 'label<TAB>text': {line[:60]!r}"
            raise DataError(msg)
        rows.append((text.strip(), label.strip()))
    if not rows:
        msg = f"the text data {str(path)!r} holds no 'label<TAB>text' line"
        raise DataError(msg)
    return rows
