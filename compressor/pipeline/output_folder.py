"""The output folder of a run: one run at a time, and the old result kept until the new one is done.

A run holds an advisory lock on ``OUTPUT/.compressor.lock`` (the operating system drops it
when the process dies, so a crashed run never blocks the next) and writes everything into
``OUTPUT/.compressor-run/``. Only when the whole run has finished are its files moved into
``OUTPUT/``, replacing the previous result; a run that fails or is interrupted leaves the
previous result as it was, and its finished stages' checkpoints in the staging folder,
where ``resume`` finds them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import UserError
from ..runtime.onnx_files import external_files

LOCK_NAME = ".compressor.lock"
STAGING_NAME = ".compressor-run"
REPORT_FILES = ("report.json", "report.md", "report.html")
HEAD_FILE = "detection_head.json"
"""A detector's `DetectionHead` (anchors, decoding), beside its ONNX files."""
RESULT_FILES = ("model.onnx", "model.int8.onnx", *REPORT_FILES, HEAD_FILE)
"""What a finished run leaves in OUTPUT/ besides checkpoints/ (and other model*.onnx files)."""

_HELD: dict[Path, RunFolder] = {}


class RunFolder:
    """An output folder locked by this process, with its staging folder."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.staging = output / STAGING_NAME
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        """Take the folder's lock, or raise `UserError` naming the run that holds it."""
        self.output.mkdir(parents=True, exist_ok=True)
        path = self.output / LOCK_NAME
        handle = path.open("a+", encoding="utf-8")
        if not _try_lock(handle):
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            msg = (
                f"output folder {str(self.output)!r} is in use by another compressor run "
                f"({holder}); wait for it to finish, or choose another output folder"
            )
            raise UserError(msg)
        handle.seek(0)
        handle.truncate()
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        handle.write(json.dumps(owner))
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.seek(0)
                self._lock.truncate()
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def start(self, *, resume: bool) -> None:
        """Make the staging folder ready.

        Without ``resume`` it starts empty. With ``resume`` an interrupted run's staging
        folder is kept; when there is none, a finished run's files are copied into it, so
        a pipeline with more stages can continue from them.
        """
        if not resume and self.staging.exists():
            shutil.rmtree(self.staging)
        if resume and not _has_checkpoints(self.staging):
            _copy_result(self.output, self.staging)
        (self.staging / "checkpoints").mkdir(parents=True, exist_ok=True)

    def promote(self, keep: list[str]) -> None:
        """Move the finished run's files into the output folder, replacing the old result.

        ``keep`` names the files of the result, relative to the staging folder
        (``checkpoints/00_baseline.pt`` is always kept when there). Checkpoints go first
        and report.json last; files of an earlier result that this one does not have (an
        INT8 file, checkpoints of stages it does not have) are removed. The tensor files
        of ONNX files over 2 GB move and go with their ONNX file.
        """
        keep = [*keep, "checkpoints/00_baseline.pt"]
        for name in list(keep):  # an ONNX file over 2 GB brings its tensor files along
            if name.endswith(".onnx") and (self.staging / name).is_file():
                extra = external_files(self.staging / name)
                keep += [p.relative_to(self.staging).as_posix() for p in extra]
        previous = [f for old in _result_files(self.output) for f in external_files(old)]
        found = [self.staging / name for name in dict.fromkeys(keep)]
        found = [p for p in found if p.is_file()]
        found.sort(key=lambda p: (p.parent.name != "checkpoints", p.name == "report.json"))
        (self.output / "checkpoints").mkdir(exist_ok=True)
        for path in found:
            os.replace(path, self.output / path.relative_to(self.staging))
        names = {p.relative_to(self.staging).as_posix() for p in found}
        for old in _result_files(self.output) + previous:
            if old.name not in names:
                old.unlink(missing_ok=True)
        for old in (self.output / "checkpoints").glob("[0-9][0-9]_*.pt"):
            if f"checkpoints/{old.name}" not in names:
                old.unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def run_folder(output: str | Path, *, resume: bool = False) -> Iterator[RunFolder]:
    """Lock ``output`` for this run and ready its staging folder; yields the `RunFolder`.

    Re-entrant within a process: an inner ``run_folder`` of a folder already held (the CLI
    trains the baseline, then runs the pipeline) gets the same object and changes nothing.
    """
    path = _absolute(output)
    held = _HELD.get(path)
    if held is not None:
        yield held
        return
    folder = RunFolder(path)
    try:
        folder.acquire()
    except OSError as exc:
        msg = f"cannot use output folder {str(path)!r}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    _HELD[path] = folder
    try:
        folder.start(resume=resume)
        yield folder
    finally:
        del _HELD[path]
        folder.release()


def _absolute(output: str | Path) -> Path:
    if not isinstance(output, (str, os.PathLike)) or not str(output):
        msg = f"output_dir must be a folder path (got: {output!r})"
        raise UserError(msg)
    path = Path(output).expanduser().absolute()
    if path.exists() and not path.is_dir():
        msg = f"output folder {str(path)!r} is a file; give a folder"
        raise UserError(msg)
    return path


def _try_lock(handle: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _describe_holder(text: str) -> str:
    try:
        owner = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))
        return f"pid {owner['pid']} on {owner['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "it has not said which"


def _has_checkpoints(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("*.pt"))


def _result_files(folder: Path) -> list[Path]:
    found = [folder / name for name in RESULT_FILES if (folder / name).is_file()]
    return found + [p for p in sorted(folder.glob("model*.onnx")) if p not in found]


def _copy_result(output: Path, staging: Path) -> None:
    """A finished run's files into the staging folder, for a resumed run to build on."""
    checkpoints = sorted((output / "checkpoints").glob("*.pt"))
    if not checkpoints:
        return
    (staging / "checkpoints").mkdir(parents=True, exist_ok=True)
    for path in checkpoints:
        _link_or_copy(path, staging / "checkpoints" / path.name)
    for path in _result_files(output):
        for file in [path, *external_files(path)]:
            _link_or_copy(file, staging / file.name)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (files are only ever replaced, never
    written in place, so the two names cannot change each other), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def check_output(path: Path, overwrite: bool, resume: bool = False) -> Path:
    """``--output`` made ready: a writable folder, empty unless ``overwrite`` or ``resume``."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        msg = f"--output {str(path)!r} is a file; give a folder"
        raise UserError(msg)
    ours = {LOCK_NAME, STAGING_NAME}
    taken = path.is_dir() and any(p.name not in ours for p in path.iterdir())
    if taken and not resume and not overwrite:
        msg = (
            f"output folder {str(path)!r} is not empty; "
            "pass --overwrite (the old result is replaced when the new run has finished) "
            "or choose another --output"
        )
        raise UserError(msg)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".compressor-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        msg = f"cannot write to output folder {str(path)!r}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    return path
