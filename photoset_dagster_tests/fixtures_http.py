"""Fixtures for the sync stage: a running loopback PhotoServer, clients, and a sleep recorder so
retry paths run instantly while their waits stay checkable."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from photoset_dagster.core.download import Downloader
from photoset_dagster.core.http import RetryPolicy, make_client
from photoset_dagster.demo.server import PhotoServer

# Generous, so a loaded machine never turns a normal request into a retry and a flaky test.
CLIENT_TIMEOUT_S = 10.0
# For the tests of the "timeout" fault (the server stalls Fault.delay_s = 2 s): short, but far above
# any normal loopback answer.
IMPATIENT_TIMEOUT_S = 1.0
# Tiny waits; tests inject a SleepRecorder anyway, so nothing actually sleeps.
FAST_RETRY = RetryPolicy(
    retries=3, backoff_base_s=0.01, backoff_cap_s=0.1, max_total_wait_s=60.0, refused_delay_s=0.01
)


class SleepRecorder:
    """Stands in for ``time.sleep``: records the requested waits and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6), seed: int = 0) -> bytes:
    """A small valid image (seeded noise) in ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def tree_entries(root: Path) -> dict[str, str]:
    """Every entry under ``root``, folders included, so a stray mkdir shows too: relative path ->
    "dir", "link -> <target>" or "file <hex bytes>". Links are never followed."""
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                snapshot[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                snapshot[key] = "dir"
            else:
                snapshot[key] = f"file {path.read_bytes().hex()}"
    return snapshot


@pytest.fixture
def photo_server() -> Iterator[PhotoServer]:
    with PhotoServer() as server:
        yield server


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with make_client(timeout_s=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def impatient_client() -> Iterator[httpx.Client]:
    with make_client(timeout_s=IMPATIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def downloader(http_client: httpx.Client, sleeps: SleepRecorder) -> Downloader:
    """A loopback-friendly downloader: plain http allowed, fast retries, a few workers."""
    return Downloader(http_client, FAST_RETRY, concurrency=4, allow_http=True, sleep=sleeps)
