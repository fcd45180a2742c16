"""Concurrent, atomic, size-capped downloads of raw image files.

A raw file appears under its final name only when it is complete and starts like a supported
image: bytes stream into a hidden temporary sibling (``.<name>.*.tmp``, the convention of
``core.atomic``) that is renamed into place at the end and removed on any failure, so an
interrupted download never leaves a truncated raw file that a rerun would take as present (B10).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx

from .filetypes import HEAD_BYTES, detect_type
from .http import (
    HttpStatusError,
    RetriesExhausted,
    RetryPolicy,
    UrlPolicyError,
    call_with_retries,
    check_download_url,
    describe_error,
    raise_for_status,
    transient_transport_errors,
)

_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class DownloadJob:
    image_id: str
    url: str
    dest: Path


@dataclass(frozen=True)
class DownloadResult:
    image_id: str
    ok: bool
    nbytes: int  # bytes stored (0 on failure)
    error: str | None
    attempts: int  # HTTP attempts made (0 when the URL was refused by policy)


class _Refused(Exception):
    """A final failure of one download (too large, not an image, cannot write): no retry."""


class Downloader:
    def __init__(
        self,
        client: httpx.Client,
        retry: RetryPolicy = RetryPolicy(),
        *,
        concurrency: int = 16,
        max_bytes: int = 200 * 1024 * 1024,
        allow_http: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._client = client
        self._retry = retry
        self.concurrency = concurrency
        self._max_bytes = max_bytes
        self._allow_http = allow_http
        self._sleep = sleep

    def check_url(self, url: object) -> str:
        """``url`` if this downloader's policy allows fetching it, else :class:`UrlPolicyError`."""
        return check_download_url(url, allow_http=self._allow_http)

    def download(self, job: DownloadJob) -> DownloadResult:
        """Fetch ``job.url`` into ``job.dest``; policy, HTTP, network and disk failures come back as a failed result."""
        try:
            url = self.check_url(job.url)
        except UrlPolicyError as error:
            return DownloadResult(job.image_id, False, 0, str(error), attempts=0)

        attempts = 0

        def attempt() -> int:
            nonlocal attempts
            attempts += 1
            return self._fetch_once(url, job.dest)

        try:
            nbytes = call_with_retries(attempt, self._retry, sleep=self._sleep)
        except (RetriesExhausted, HttpStatusError, _Refused) as error:
            reason = str(error)
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # final: redirect loop, bad Location, bad encoding, ...
            reason = describe_error(error)
        except OSError as error:  # e.g. dest's folder cannot be created, disk full
            reason = f"cannot write {job.dest}: {error}"
        else:
            return DownloadResult(job.image_id, True, nbytes, None, attempts)
        return DownloadResult(job.image_id, False, 0, reason, attempts)

    def download_many(
        self, jobs: Iterable[DownloadJob], on_result: Callable[[DownloadResult], None] | None = None
    ) -> list[DownloadResult]:
        """Download on ``concurrency`` threads sharing the one client; results in job order.

        ``on_result`` is called as each download finishes, on the calling thread (so it needs no
        locking). An exception (e.g. Ctrl-C) cancels the queued downloads; running ones finish
        and clean up their temporaries.
        """
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="download")
        try:
            futures = [pool.submit(self.download, job) for job in jobs]
            if on_result is not None:
                for future in as_completed(futures):
                    on_result(future.result())
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch_once(self, url: str, dest: Path) -> int:
        """One attempt: stream ``url`` into ``dest`` atomically; returns the bytes stored."""
        with transient_transport_errors(), self._client.stream("GET", url) as response:
            raise_for_status(response)
            if response.history:  # a redirect must not smuggle in a refused scheme (e.g. https -> http)
                try:
                    self.check_url(str(response.url))
                except UrlPolicyError as error:
                    raise _Refused(f"redirected to a refused url: {error}") from None
            declared = _content_length(response)
            if declared is not None and declared > self._max_bytes:
                raise _Refused(f"Content-Length {declared} exceeds the {self._max_bytes}-byte limit")
            return self._stream_to(response, dest)

    def _stream_to(self, response: httpx.Response, dest: Path) -> int:
        """Write the body to a temporary sibling of ``dest`` and rename it into place once complete.

        A body shorter than its Content-Length raises httpx.RemoteProtocolError (h11 enforces the
        length), which the caller retries; the temporary is removed on every failure.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                nbytes = 0
                head = b""
                for chunk in response.iter_bytes(_CHUNK_BYTES):
                    nbytes += len(chunk)
                    if nbytes > self._max_bytes:
                        raise _Refused(f"body exceeds the {self._max_bytes}-byte limit")
                    if len(head) < HEAD_BYTES:
                        # Check the type as soon as the head is in, so a large HTML page is not fetched whole.
                        head += chunk[: HEAD_BYTES - len(head)]
                        if len(head) == HEAD_BYTES:
                            _require_image(head)
                    out.write(chunk)
                if len(head) < HEAD_BYTES:  # a body shorter than the head
                    _require_image(head)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return nbytes


def _content_length(response: httpx.Response) -> int | None:
    """The declared body size, or None when absent or malformed (then only max_bytes bounds it)."""
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _require_image(head: bytes) -> None:
    if detect_type(head) is None:
        raise _Refused(f"not a supported image (starts with {head[:16]!r})")
