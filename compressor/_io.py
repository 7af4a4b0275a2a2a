"""Crash-safe file writes: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_umask: int | None = None
_umask_lock = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    A crash or an exception leaves ``path`` as it was (absent or old), never half-written.
    The file gets the mode a plain ``open`` would give it (0666 less the umask). A full
    disk (or quota, or file size limit) becomes a `UserError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        if _is_no_space(exc):
            raise _write_error(path, exc) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def umask() -> int:
    """The process's umask (read once: setting it is the only way to read it)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
    return _umask


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE
    text = str(exc)  # torch.save reports a failed write as a RuntimeError of its zip writer
    return any(k in text for k in ("write failed", "No space left", "inline_container"))


def _write_error(path: Path, exc: BaseException) -> UserError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    reason = reason.splitlines()[0] if reason else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        reason = f"the disk is full or a size limit was reached ({reason})"
    elif _is_no_space(exc):
        reason = f"writing failed: the disk may be full or a size limit reached ({reason})"
    return UserError(
        f"cannot write {str(path)!r}: {reason}; what was written before is kept (free space, "
        "then rerun; a pipeline run continues with --resume)"
    )
