"""Concurrent, atomic, size-capped, time-bounded downloads of raw image files.

A raw file appears under its final name only when it is complete and starts like a supported
image: bytes stream into a hidden temporary sibling (``.<name>.*.tmp``, the convention of
``core.atomic``) that is renamed into place at the end and removed on any failure, so an
interrupted download never leaves a truncated raw file that a rerun would take as present (B10).

No server can hold a download forever. An attempt gets ``header_timeout_s`` for the response
headers (connect, TLS and redirects included), then its body must keep an average of at least
``min_rate_bps`` once ``rate_grace_s`` have passed; as the body is at most its Content-Length (or
``max_bytes``), that makes the attempt's deadline :meth:`Downloader.attempt_deadline_s`. With at most
``retry.attempts`` attempts and ``retry.max_total_wait_s`` of backoff per download, a whole batch is
bounded by :meth:`Downloader.worst_case_seconds`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx

from .filetypes import HEAD_BYTES, detect_type
from .http import (
    Deadline,
    FailureKind,
    FetchError,
    PermanentError,
    RetriesExhausted,
    RetryPolicy,
    UrlPolicyError,
    call_with_retries,
    check_download_url,
    io_deadline,
    iter_body,
    open_response,
    raise_for_status,
)


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
    kind: FailureKind | None = None  # why it failed (None on success)
    retries_exhausted: bool = False  # failed transiently on every attempt the retry policy allowed


class DownloadCancelled(Exception):
    """The run was interrupted: the download stopped between chunks or backoff waits, its temporary removed."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise DownloadCancelled("interrupted")


class Downloader:
    def __init__(
        self,
        client: httpx.Client,
        retry: RetryPolicy = RetryPolicy(),
        *,
        concurrency: int = 16,
        max_bytes: int = 200 * 1024 * 1024,
        allow_http: bool = False,
        sleep: Callable[[float], object] | None = None,
        header_timeout_s: float = 30.0,
        min_rate_bps: float = 16 * 1024,
        rate_grace_s: float = 10.0,
    ) -> None:
        """``client`` should come from :func:`~.http.make_client`: only its sockets obey the deadlines
        (with another client a stalled read still ends, but only at httpx's per-read timeout)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if min_rate_bps <= 0:
            raise ValueError(f"min_rate_bps must be positive, got {min_rate_bps}")
        self._client = client
        self._retry = retry
        self.concurrency = concurrency
        self._max_bytes = max_bytes
        self._allow_http = allow_http
        self._sleep = sleep
        self.header_timeout_s = header_timeout_s
        self.min_rate_bps = min_rate_bps
        self.rate_grace_s = rate_grace_s

    def check_url(self, url: object) -> str:
        """``url`` if this downloader's policy allows fetching it, else :class:`UrlPolicyError`."""
        return check_download_url(url, allow_http=self._allow_http)

    def attempt_deadline_s(self, size_bound: int | None = None) -> float:
        """The longest one attempt can take for a body of at most ``size_bound`` bytes (default
        ``max_bytes``): the headers' timeout, then the body at the minimum rate, or the grace period."""
        return self.header_timeout_s + self._body_allowance_s(self._max_bytes if size_bound is None else size_bound)

    def worst_case_seconds(self, jobs: int = 1) -> float:
        """An upper bound on the wall time of ``download_many`` over ``jobs`` downloads, whatever the
        servers do: each download makes at most ``retry.attempts`` attempts of at most
        :meth:`attempt_deadline_s` and sleeps at most ``retry.max_total_wait_s`` between them, and
        ``concurrency`` of them run at once. (Local disk time and DNS lookups come on top.)"""
        per_download = self._retry.attempts * self.attempt_deadline_s() + self._retry.max_total_wait_s
        return math.ceil(jobs / self.concurrency) * per_download

    def download(self, job: DownloadJob, cancel: threading.Event | None = None) -> DownloadResult:
        """Fetch ``job.url`` into ``job.dest``; policy, HTTP, network and disk failures come back as a failed
        result. Once ``cancel`` is set it stops at the next chunk or during a backoff wait
        (:class:`DownloadCancelled`), within one read timeout at most."""
        try:
            url = self.check_url(job.url)
        except UrlPolicyError as error:
            return DownloadResult(job.image_id, False, 0, str(error), attempts=0, kind="url_refused")

        attempts = 0

        def attempt() -> int:
            nonlocal attempts
            attempts += 1
            return self._fetch_once(url, job.dest, cancel)

        def pause(seconds: float) -> None:  # a backoff an interrupt cuts short
            (self._sleep or (cancel or threading.Event()).wait)(seconds)
            _check(cancel)

        try:
            nbytes = call_with_retries(attempt, self._retry, sleep=pause)
        except FetchError as error:
            exhausted = isinstance(error, RetriesExhausted)
            return DownloadResult(job.image_id, False, 0, str(error), attempts, error.kind, exhausted)
        except OSError as error:  # e.g. dest's folder cannot be created, disk full
            return DownloadResult(job.image_id, False, 0, f"cannot write {job.dest}: {error}", attempts, "disk")
        return DownloadResult(job.image_id, True, nbytes, None, attempts)

    def download_many(
        self, jobs: Iterable[DownloadJob], on_result: Callable[[DownloadResult], None] | None = None
    ) -> list[DownloadResult]:
        """Download on ``concurrency`` threads sharing the one client; results in job order.

        ``on_result`` is called as each download finishes, on the calling thread (so it needs no
        locking). An exception (e.g. Ctrl-C) cancels the queued downloads; running ones finish
        (within their deadlines) and clean up their temporaries.
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

    def _body_allowance_s(self, size_bound: int) -> float:
        return max(self.rate_grace_s, size_bound / self.min_rate_bps)

    def _fetch_once(self, url: str, dest: Path, cancel: threading.Event | None = None) -> int:
        """One attempt: stream ``url`` into ``dest`` atomically; returns the bytes stored."""
        with (
            io_deadline(self.header_timeout_s) as deadline,
            open_response(self._client, url, allow_http=self._allow_http) as response,
        ):
            raise_for_status(response)
            declared = _content_length(response)
            if declared is not None and declared > self._max_bytes:
                raise PermanentError(
                    f"Content-Length {declared} exceeds the {self._max_bytes}-byte limit", kind="too_large"
                )
            return self._stream_to(response, dest, deadline, self._max_bytes if declared is None else declared,
                                   cancel)

    def _stream_to(self, response: httpx.Response, dest: Path, deadline: Deadline, size_bound: int,
                   cancel: threading.Event | None = None) -> int:
        """Write the body to a temporary sibling of ``dest`` and rename it into place once complete.

        ``deadline`` moves with the bytes received: with ``n`` bytes in after ``t`` seconds the
        average stays at ``min_rate_bps`` until ``t = n / min_rate_bps`` (and never falls below it
        within the grace period), so that is when the next bytes are due; it never moves past the
        body's allowance for ``size_bound`` bytes. A body shorter than its Content-Length is a
        truncated one (h11 enforces the length), which the caller retries; the temporary is removed
        on every failure.
        """
        started = time.monotonic()
        latest = started + self._body_allowance_s(size_bound)

        def move_deadline() -> None:
            due = started + max(self.rate_grace_s, response.num_bytes_downloaded / self.min_rate_bps)
            deadline.at = min(due, latest)

        move_deadline()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                nbytes = 0
                head = b""
                for chunk in iter_body(response):
                    _check(cancel)
                    move_deadline()
                    nbytes += len(chunk)
                    if nbytes > self._max_bytes:
                        raise PermanentError(f"body exceeds the {self._max_bytes}-byte limit", kind="too_large")
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
        raise PermanentError(f"not a supported image (starts with {head[:16]!r})", kind="not_an_image")
