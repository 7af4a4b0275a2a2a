"""The errors compressor raises.

`UserError` and its subclasses mean "something the caller gave us is wrong, and here is
what": the CLI prints their message on one line and exits with status 2. Anything else that
escapes is a bug in compressor (or in a library under it) and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CompressorError(Exception):
    """Base class of every error compressor raises on purpose."""


class UserError(CompressorError):
    """A problem the user can fix: a bad option, model, data set or path."""


class RecipeError(UserError, ValueError):
    """A stage, option or recipe that is not allowed."""


class DataError(UserError):
    """Training or evaluation data that cannot be used (empty, wrong shape)."""


class ModelError(UserError):
    """A model that a step (pruning, export) cannot handle; names the layer or op."""


class ExportError(ModelError):
    """ONNX export failed, or ONNX Runtime disagrees with torch on the exported file."""
