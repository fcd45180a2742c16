"""Atomic file writes: a temporary file in the destination folder, fsync, then rename.

A reader (or a crash) never sees a half-written file under the final name. Temporary names start
with '.' and end in '.tmp', so globs like ``*.npy`` or ``shard-*.tar`` never match them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on clean exit it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    with atomic_open(path, "w", fsync=fsync) as handle:
        handle.write(text)


def atomic_write_json(path: Path, obj: Any, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n", fsync=fsync)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save_npy_atomic(path: Path, array: np.ndarray, fsync: bool = True) -> None:
    atomic_write_bytes(path, npy_bytes(array), fsync=fsync)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporaries left by a crashed writer in ``directory``; returns how many."""
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in os.scandir(directory):
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
