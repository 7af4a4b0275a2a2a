"""An ONNX file and the tensor files beside it: models over 2 GB keep their weights outside
the protobuf, and their size, moves and removals must count those files too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def external_files(path: str | Path) -> list[Path]:
    """The files in ``path``'s folder that hold its external tensors (usually none).

    Locations that point outside the folder are left out: they are not ours to count,
    move or remove.
    """
    import onnx  # here, not at import: the CLI starts without it

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file (or unreadable): it has no tensor files we know of
        return []
    folder = path.parent.resolve()
    found: dict[Path, None] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                file = (path.parent / entry.value).resolve()
                if file.parent == folder and file != path.resolve():
                    found[path.parent / entry.value] = None
    return list(found)


def onnx_files(path: str | Path) -> list[Path]:
    """``path`` and its external tensor files."""
    return [Path(path), *external_files(path)]


def onnx_size(path: str | Path) -> int:
    """Bytes on disk of ``path`` and its external tensor files."""
    return sum(p.stat().st_size for p in onnx_files(path) if p.is_file())
