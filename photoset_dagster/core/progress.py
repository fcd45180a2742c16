"""Progress lines with rate and ETA for long loops (logged, so they show in the UI and the CLI alike)."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressMeter:
    def __init__(self, label: str, total: int, log: Callable[[str], None], every_s: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.count = 0
        self._log = log
        self._every_s = every_s
        self._started = time.monotonic()
        self._last = self._started

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self._every_s or self.count == self.total:
            self._last = now
            self._log(self.line())

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self, width: int = 24) -> str:
        filled = min(int(width * self.count / self.total), width) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        head = f"{self.label}: [{bar}] {self.count}/{self.total}"
        if self.count >= self.total:  # finished: how long it took (a rate over nothing to do means nothing)
            return f"{head} in {time.monotonic() - self._started:.1f}s"
        rate = self.rate
        eta = f"{(self.total - self.count) / rate:.0f}s" if rate > 0 else "?"
        return f"{head} ({rate:.2f}/s, ETA {eta})"
