"""Atomic file writes: a temp file in the same directory, fsync, then rename.

A reader never sees a half-written file, and a writer killed half-way leaves the previous
version intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_deferred = threading.local()


@contextlib.contextmanager
def deferred_fsync() -> Iterator[None]:
    """Within this block (this thread), :func:`write_bytes` renames without waiting for the disk;
    every file written is fsynced when the block ends, before the caller goes on (submit: before
    sbatch). The fsyncs run from a few threads at once, so the file system's journal commits them
    in groups instead of one commit per file (ext4 here: 3 ms a commit while other processes write,
    three files per run). A crash inside the block can leave an empty file under its final name —
    the same as no file for the callers (a submission that did not reach sbatch). Raises the first
    OSError of an fsync."""
    outer: Optional[List[str]] = getattr(_deferred, "paths", None)
    _deferred.paths = paths = [] if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _deferred.paths = None
            fsync_paths(paths)


def fsync_paths(paths: List[str], threads: int = 16) -> None:
    """fsync every path (a missing one is skipped), ``threads`` at a time: os.fsync releases the
    GIL, and concurrent fsyncs share journal commits (group commit)."""
    if len(paths) < 4:
        for p in paths:
            fsync_path(p)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(paths)), thread_name_prefix="fsync") as pool:
        for _ in pool.map(fsync_path, paths):
            pass


def fsync_path(path: PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # removed since (a refused submission cleans up)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the permissions a plain ``open`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600
            deferred = getattr(_deferred, "paths", None)
            if deferred is None:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if deferred is not None:
            deferred.append(str(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON atomically. NaN/Inf are written as null so strict parsers can read it."""
    return write_text(path, json.dumps(_finite(obj), indent=indent, sort_keys=False) + "\n")


def read_json(path: PathLike, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default


def load_json(path: PathLike, what: str = "file", missing_hint: str = "") -> Any:
    """Read a JSON file the user or a job wrote; a missing or broken file is a one-line UserError
    that names the file (and the line for broken JSON)."""
    from ssflctl.errors import UserError

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found{missing_hint}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: {what} is not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
