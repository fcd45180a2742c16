"""Disk preflight: refuse work that would fill the disk, before it writes anything.

A pass, a dataset rebuild and the shard writer each estimate the bytes they are about to write and
refuse, with one line, when the free space would fall below a floor (the seed aborted below 20 GB;
``photoset.min_free_gb``). A full disk mid-pass would fail image after image instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

GB = 1024**3


class PreflightError(RuntimeError):
    """Not enough free disk for the work asked; nothing was written."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(path: Path, needed_bytes: int, min_free_gb: float, what: str) -> None:
    free = free_bytes(path)
    floor = int(min_free_gb * GB)
    if free - needed_bytes < floor:
        raise PreflightError(
            f"not enough free disk for {what}: it needs about {needed_bytes / GB:.2f} GB and the floor is "
            f"{min_free_gb:g} GB (photoset.min_free_gb), but {path} has {free / GB:.2f} GB free"
        )
