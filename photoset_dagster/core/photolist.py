"""The approved-photo list: ``photos.json?page=N`` paged until an empty array.

Unlike the seed, paging never loops forever and never skips a failed page (B11): a page that still
fails after retries ends the listing there, marked incomplete, because the pages after it cannot be
trusted to be the rest of the list. Consumers (prune above all) act only on a ``complete`` listing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from .artefacts import read_json
from .atomic import atomic_write_json
from .http import (
    FetchError,
    PermanentError,
    RetryPolicy,
    TransientError,
    UrlPolicyError,
    call_with_retries,
    check_download_url,
    io_deadline,
    iter_body,
    open_response,
    raise_for_status,
    short_repr,
)
from .layout import InvalidImageId, validate_image_id


@dataclass(frozen=True)
class PhotoItem:
    image_id: str
    url: str | None  # exportable_url as given (a non-string counts as absent); checked at download time


@dataclass(frozen=True)
class InvalidItem:
    page: int
    index: int  # position within the page, 0-based
    reason: str


@dataclass
class PhotoListing:
    items: list[PhotoItem]  # listing order, de-duplicated by image_id (first wins)
    invalid: list[InvalidItem]
    duplicates: int
    pages_fetched: int
    complete: bool  # paging reached the empty page: no failed page, no end_page/limit cut
    error: str | None  # why paging stopped early on a failure (URL + last error)
    fetched_at: str  # ISO 8601, UTC

    @property
    def ids(self) -> list[str]:
        return [item.image_id for item in self.items]

    @property
    def entries(self) -> int:
        """Entries the pages held: valid images, invalid entries and repeated ids."""
        return len(self.items) + len(self.invalid) + self.duplicates

    @property
    def digest(self) -> str:
        """Identifies the set of ids, whatever their order: equal digests, nothing added or removed."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        # The digest is derived, stored only for people and tools reading the file.
        return {**asdict(self), "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhotoListing:
        return cls(
            items=[PhotoItem(**item) for item in data["items"]],
            invalid=[InvalidItem(**item) for item in data["invalid"]],
            duplicates=data["duplicates"],
            pages_fetched=data["pages_fetched"],
            complete=data["complete"],
            error=data["error"],
            fetched_at=data["fetched_at"],
        )


class PhotoListError(RuntimeError):
    """A page could not be fetched (after retries where retrying made sense); names the URL."""


class PhotoListClient:
    def __init__(
        self,
        base_url: str,
        client: httpx.Client,
        retry: RetryPolicy = RetryPolicy(),
        *,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
        allow_http: bool = False,
        page_timeout_s: float = 120.0,
        max_page_bytes: int = 64 * 1024 * 1024,
        max_logged_invalid: int = 20,
    ) -> None:
        """``page_timeout_s`` bounds one attempt at a page, headers and body together (enforced on
        the sockets of a :func:`~.http.make_client` client); ``max_logged_invalid`` invalid entries
        are logged one per line, the rest counted in one line (all stay in ``PhotoListing.invalid``)."""
        self.base_url = base_url
        self._client = client
        self._retry = retry
        self._sleep = sleep
        self._log = log or (lambda line: None)
        self._allow_http = allow_http
        self._page_timeout_s = page_timeout_s
        self._max_page_bytes = max_page_bytes
        self._max_logged_invalid = max_logged_invalid

    def page_url(self, page: int) -> str:
        separator = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{separator}page={page}"

    def fetch_page(self, page: int) -> list[Any]:
        """The JSON array of one page.

        The URL, and every redirect, must pass the download URL policy (https unless ``allow_http``);
        a refused one raises :class:`PhotoListError` before any request. Retries (with backoff,
        honouring Retry-After) on 408/425/429/5xx, timeouts, connection errors, truncated or
        too-slow bodies and bodies that are not a JSON array (an HTML error page, a JSON object):
        all typical of an overloaded or restarting server or its proxy. Raises
        :class:`PhotoListError` at once for other statuses, refused redirects and oversized pages,
        and once retries run out.
        """
        url = self.page_url(page)
        try:
            check_download_url(url, allow_http=self._allow_http)
        except UrlPolicyError as error:
            raise PhotoListError(f"refusing to fetch the photo list: {error}") from None
        self._log(f"page {page}: fetching {url}")

        def attempt() -> list[Any]:
            with (
                io_deadline(self._page_timeout_s),
                open_response(self._client, url, allow_http=self._allow_http) as response,
            ):
                raise_for_status(response)
                return _parse_page(self._read_page(response))

        def log_retry(error: TransientError, attempt_number: int, delay: float) -> None:
            self._log(f"page {page}: attempt {attempt_number} failed: {error}; retrying in {delay:g}s")

        try:
            return call_with_retries(attempt, self._retry, sleep=self._sleep, on_retry=log_retry)
        except FetchError as error:
            raise PhotoListError(f"{url}: {error}") from error

    def _read_page(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in iter_body(response):
            size += len(chunk)
            if size > self._max_page_bytes:
                raise PermanentError(f"page exceeds the {self._max_page_bytes}-byte limit", kind="too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def fetch_listing(
        self,
        start_page: int = 1,
        end_page: int | None = None,
        limit: int | None = None,
        *,
        time_budget_s: float | None = None,
    ) -> PhotoListing:
        """Page from ``start_page`` until an empty page, ``end_page`` (inclusive), ``limit`` valid items or a failure.

        Never raises for a failed page: the listing comes back with ``complete=False`` and ``error``.
        ``time_budget_s`` bounds the whole listing (a sensor tick has about a minute): past it, paging
        stops there, incomplete. Logs a line per page with its counts and one per invalid entry (up to
        ``max_logged_invalid``).
        """
        started = time.monotonic()
        fetched_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        collector = _ItemCollector(limit)
        pages_fetched = 0
        complete = False
        error: str | None = None
        page = start_page
        while (end_page is None or page <= end_page) and not collector.full:
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                error = f"the listing took longer than its {time_budget_s:g}s budget (stopped before page {page})"
                self._log(f"warning: {error}")
                break
            try:
                body = self.fetch_page(page)
            except PhotoListError as failure:
                error = str(failure)
                self._log(f"warning: page {page}: fetch failed; listing is incomplete: {failure}")
                break
            pages_fetched += 1
            if not body:
                self._log(f"page {page}: empty; stopping")
                complete = True
                break
            new_invalid = len(collector.invalid)
            counts = collector.add_page(page, body)
            self._log(f"page {page}: {len(body)} items ({counts})")
            for entry in collector.invalid[new_invalid : self._max_logged_invalid]:
                self._log(f"warning: page {entry.page}: invalid entry {entry.index}: {entry.reason}")
            if collector.full:
                self._log(f"page {page}: limit of {limit} items reached; stopping")
            page += 1
        unlogged = len(collector.invalid) - self._max_logged_invalid
        if unlogged > 0:
            self._log(f"... and {unlogged} more invalid entries")
        return PhotoListing(
            items=collector.items,
            invalid=collector.invalid,
            duplicates=collector.duplicates,
            pages_fetched=pages_fetched,
            complete=complete,
            error=error,
            fetched_at=fetched_at,
        )


def _parse_page(body: bytes) -> list[Any]:
    """The page's JSON array. Anything else is retried: a proxy's HTML error page, a maintenance
    object or a cut-off body are what an overloaded or restarting server sends."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: hostile nesting like "[[[[..."
        raise TransientError(f"body is not JSON ({error})", kind="bad_page") from None
    if not isinstance(data, list):
        raise TransientError(f"expected a JSON array, got {type(data).__name__}", kind="bad_page")
    return data


class _ItemCollector:
    """Validates raw list items and keeps the first occurrence of each id, up to ``limit`` items."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.items: list[PhotoItem] = []
        self.invalid: list[InvalidItem] = []
        self.duplicates = 0
        self._seen: set[str] = set()

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.items) >= self.limit

    def add_page(self, page: int, body: list[Any]) -> _PageCounts:
        counts = _PageCounts()
        for index, raw in enumerate(body):
            if self.full:
                break
            try:
                item = _parse_item(raw)
            except _RejectedItem as error:
                self.invalid.append(InvalidItem(page, index, str(error)))
                counts.invalid += 1
                continue
            if item.image_id in self._seen:
                self.duplicates += 1
                counts.duplicates += 1
                continue
            self._seen.add(item.image_id)
            self.items.append(item)
            counts.valid += 1
        return counts


@dataclass
class _PageCounts:
    valid: int = 0
    invalid: int = 0
    duplicates: int = 0

    def __str__(self) -> str:
        return f"{self.valid} valid, {self.invalid} invalid, {self.duplicates} duplicates"


class _RejectedItem(ValueError):
    """A list item that cannot become a :class:`PhotoItem`; the message is the reason."""


def _parse_item(raw: object) -> PhotoItem:
    if not isinstance(raw, dict):
        raise _RejectedItem(f"item is not an object: {short_repr(raw)}")
    if "filename" not in raw:
        raise _RejectedItem(f"item has no filename: {short_repr(raw)}")
    filename = raw["filename"]
    try:
        image_id = validate_image_id(filename)
    except InvalidImageId as error:
        raise _RejectedItem(f"bad filename {short_repr(filename)}: {error}") from None
    url = raw.get("exportable_url")
    return PhotoItem(image_id, url if isinstance(url, str) else None)


def save_listing(path: Path, listing: PhotoListing) -> None:
    atomic_write_json(path, listing.to_json())


def load_listing(path: Path) -> PhotoListing | None:
    """The saved listing, or None when there is none or it cannot be read (the next sync rewrites it)."""
    data = read_json(path)
    if data is None:
        return None
    try:
        return PhotoListing.from_json(data)
    except (KeyError, TypeError):
        return None
