"""The approved-photo list: ``photos.json?page=N`` paged until an empty array.

Unlike the seed, paging never loops forever and never skips a failed page (B11): a page that still
fails after retries ends the listing there, marked incomplete, because the pages after it cannot be
trusted to be the rest of the list. Consumers (prune above all) act only on a ``complete`` listing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from .artefacts import read_json
from .atomic import atomic_write_json
from .http import (
    HttpStatusError,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    call_with_retries,
    describe_error,
    raise_for_status,
    short_repr,
    transient_transport_errors,
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
    ) -> None:
        self.base_url = base_url
        self._client = client
        self._retry = retry
        self._sleep = sleep
        self._log = log or (lambda line: None)

    def page_url(self, page: int) -> str:
        separator = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{separator}page={page}"

    def fetch_page(self, page: int) -> list[Any]:
        """The JSON array of one page.

        Retries (with backoff, honouring Retry-After) on 408/425/429/5xx, timeouts, connection errors
        and bodies that are not JSON: all typical of an overloaded or restarting server. Raises
        :class:`PhotoListError` at once for other statuses and for JSON that is not an array: a
        well-formed answer of the wrong shape is a contract violation that repeating will not fix.
        """
        url = self.page_url(page)
        self._log(f"page {page}: fetching {url}")

        def attempt() -> list[Any]:
            with transient_transport_errors():
                response = self._client.get(url)
            raise_for_status(response)
            try:
                body = response.json()
            except ValueError as error:
                raise TransientError(f"body is not JSON ({error})") from error
            if not isinstance(body, list):
                raise PhotoListError(f"{url}: expected a JSON array, got {type(body).__name__}")
            return body

        def log_retry(error: TransientError, attempt_number: int, delay: float) -> None:
            self._log(f"page {page}: attempt {attempt_number} failed: {error}; retrying in {delay:g}s")

        try:
            return call_with_retries(attempt, self._retry, sleep=self._sleep, on_retry=log_retry)
        except (RetriesExhausted, HttpStatusError) as error:
            raise PhotoListError(f"{url}: {error}") from error
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # e.g. unsupported scheme, redirect loop
            raise PhotoListError(f"{url}: {describe_error(error)}") from error

    def fetch_listing(self, start_page: int = 1, end_page: int | None = None, limit: int | None = None) -> PhotoListing:
        """Page from ``start_page`` until an empty page, ``end_page`` (inclusive), ``limit`` valid items or a failure.

        Never raises for a failed page: the listing comes back with ``complete=False`` and ``error``.
        """
        fetched_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        collector = _ItemCollector(limit)
        pages_fetched = 0
        complete = False
        error: str | None = None
        page = start_page
        while (end_page is None or page <= end_page) and not collector.full:
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
            self._log(f"page {page}: {len(body)} items")
            collector.add_page(page, body)
            page += 1
        return PhotoListing(
            items=collector.items,
            invalid=collector.invalid,
            duplicates=collector.duplicates,
            pages_fetched=pages_fetched,
            complete=complete,
            error=error,
            fetched_at=fetched_at,
        )


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

    def add_page(self, page: int, body: list[Any]) -> None:
        for index, raw in enumerate(body):
            if self.full:
                return
            try:
                item = _parse_item(raw)
            except _RejectedItem as error:
                self.invalid.append(InvalidItem(page, index, str(error)))
                continue
            if item.image_id in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(item.image_id)
            self.items.append(item)


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
