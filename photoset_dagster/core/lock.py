"""One advisory lock on the data root so prune never runs while a pass writes (the original's race R1).

Writers of per-image artefacts and the dataset builder hold it shared; prune holds it exclusive.
``flock`` locks die with their process, so a crashed run never leaves the data locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class DataLockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def data_lock(lock_path: Path, exclusive: bool, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    kind = "exclusive" if exclusive else "shared"
                    raise DataLockTimeout(
                        f"could not take the {kind} data lock {lock_path} within {timeout_s:.0f}s: "
                        "another photoset run is writing (prune needs all passes to finish first)"
                    ) from None
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)
