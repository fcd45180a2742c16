"""One advisory lock on the data root so prune never runs while a pass writes (the original's race R1).

Writers of per-image artefacts and the dataset builder hold it shared; prune holds it exclusive.
``flock`` locks die with their process, so a crashed run never leaves the data locked. Each holder
also leaves a small note (pid, host, what, since) beside the lock so a waiter can say what it is
waiting for; notes of processes that are gone are ignored and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .artefacts import now_iso


class DataLockTimeout(TimeoutError):
    pass


class DataLock:
    """A shared or exclusive flock on ``lock_path``; ``acquire`` waits, saying who holds it."""

    def __init__(self, lock_path: Path, exclusive: bool, what: str = "photoset") -> None:
        self.lock_path = Path(lock_path)
        self.exclusive = exclusive
        self.what = what
        self._fd: int | None = None
        self._note: Path | None = None

    @property
    def mode(self) -> str:
        return "exclusive" if self.exclusive else "shared"

    def try_acquire(self) -> bool:
        if self._fd is None:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._leave_note()
        return True

    def waiting(self, timeout_s: float = 600.0, *, report_every_s: float = 5.0,
                cancel: threading.Event | None = None) -> Iterator[str]:
        """Take the lock, waiting at most ``timeout_s`` (sleeping, not spinning) and yielding what it
        waits for every ``report_every_s``; ``cancel`` stops the wait (InterruptedError)."""
        started = time.monotonic()
        next_report = started
        while not self.try_acquire():
            now = time.monotonic()
            if now - started >= timeout_s:
                self.release()
                raise DataLockTimeout(
                    f"could not take the {self.mode} data lock {self.lock_path} within {timeout_s:.0f}s: "
                    f"held by {self.describe_holders()}"
                )
            if now >= next_report:
                yield f"waiting for the {self.mode} data lock, held by {self.describe_holders()}"
                next_report = now + report_every_s
            if (cancel or threading.Event()).wait(0.2):
                self.release()
                raise InterruptedError("interrupted while waiting for the data lock")

    def acquire(self, timeout_s: float = 600.0) -> None:
        for _ in self.waiting(timeout_s):
            pass

    def release(self) -> None:
        if self._note is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._note)
            with contextlib.suppress(OSError):  # the last holder leaves no empty folder behind
                os.rmdir(self._note.parent)
            self._note = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def downgrade(self) -> None:
        """Exclusive -> shared without letting go in between for an exclusive waiter to slip in
        (flock converts in place)."""
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        self.exclusive = False
        self._leave_note()

    def describe_holders(self) -> str:
        notes = live_holders(self.lock_path)
        if not notes:
            return "another process (no note left)"
        return "; ".join(
            f"{note.get('what', '?')} ({note.get('mode')}, pid {note.get('pid')} on {note.get('host')}, "
            f"since {note.get('since')})"
            for note in notes
        )

    def _leave_note(self) -> None:
        notes = _notes_dir(self.lock_path)
        notes.mkdir(parents=True, exist_ok=True)
        if self._note is None:
            self._note = notes / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        body = {"pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode, "what": self.what,
                "since": now_iso()}
        self._note.write_text(json.dumps(body))


def _notes_dir(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holders")


def live_holders(lock_path: Path) -> list[dict]:
    """Notes of the lock's current holders; notes of dead processes on this host are removed."""
    host = socket.gethostname()
    holders = []
    try:
        entries = list(os.scandir(_notes_dir(lock_path)))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            note = json.loads(Path(entry.path).read_text())
        except (OSError, ValueError):
            continue
        if note.get("host") == host and not _pid_alive(note.get("pid")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            continue
        holders.append(note)
    return holders


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def data_lock(lock_path: Path, exclusive: bool, timeout_s: float = 600.0, what: str = "photoset") -> Iterator[None]:
    lock = DataLock(lock_path, exclusive, what)
    lock.acquire(timeout_s)
    try:
        yield
    finally:
        lock.release()
