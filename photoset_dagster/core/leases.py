"""Leases that die with their process: a run's liveness marker and a device's owner.

A lease is an exclusive ``flock`` on a small file that also names its holder (pid, host, what,
since). The kernel drops the lock when the process dies, however it dies (``kill -9``, out of
memory, a lost SSH session), so another process can tell a live holder from a dead one by simply
trying the lock: there is nothing to clean up by hand and no timeout to wait out on one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .artefacts import now_iso


class FileLease:
    """An exclusive flock on ``path`` held until :meth:`release` or the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def try_take(cls, path: Path, holder: dict | None = None) -> FileLease | None:
        """The lease, or None when a live process holds it. ``holder`` (what, device, ...) is written
        into the file with this process's pid and host; None only probes and leaves the note as it is."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_OPEN_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _same_file(fd, path):
                break
            # The holder removed the file between our open and our lock: this lock is on a file nobody
            # else will ever open, so it proves nothing. Open the path again.
            os.close(fd)
        else:
            return None
        if holder is not None:
            note = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), **holder}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(note).encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = True) -> None:
        if self._fd is None:
            return
        if remove:  # before unlocking: whoever opened it just before sees, once locked, that it is gone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


_OPEN_ATTEMPTS = 8  # retries only while other processes keep removing the file under us


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def holder_of(path: Path) -> dict | None:
    """The note a lease file's holder left (None if there is no readable note)."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def is_abandoned(path: Path) -> bool:
    """True when ``path`` exists and nobody holds its lock: its holder died (or released without
    removing it). Takes and drops the lock to find out; never blocks."""
    if not path.exists():
        return False
    lease = FileLease.try_take(path)
    if lease is None:
        return False
    lease.release(remove=False)
    return True


class DeviceBusy(TimeoutError):
    pass


def lease_device(
    lease_dir: Path,
    candidates: Sequence[str],
    *,
    what: str,
    timeout_s: float = 24 * 3600.0,
    on_wait: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[str, FileLease]:
    """Own the first free device of ``candidates`` ("cuda:0", "cuda:1", ...) until the lease is released
    or the process ends; waits (sleeping, saying who holds them) while all are taken."""
    started = time.monotonic()
    next_report = started
    while True:
        for device in candidates:
            lease = FileLease.try_take(lease_dir / f"{_file_name(device)}.lock", {"device": device, "what": what})
            if lease is not None:
                return device, lease
        now = time.monotonic()
        if now - started > timeout_s:
            raise DeviceBusy(f"no free device among {', '.join(candidates)} within {timeout_s:.0f}s")
        if on_wait is not None and now >= next_report:
            holders = [holder_of(lease_dir / f"{_file_name(device)}.lock") or {} for device in candidates]
            described = "; ".join(f"{d} by {h.get('what', '?')} (pid {h.get('pid')}, since {h.get('since')})"
                                  for d, h in zip(candidates, holders))
            on_wait(f"waiting for a free device: {described}")
            next_report = now + 5.0
        if cancel is not None:
            if cancel.wait(0.5):
                raise InterruptedError("interrupted while waiting for a device")
        else:
            time.sleep(0.5)


def _file_name(device: str) -> str:
    return device.replace(":", "-").replace("/", "-")
