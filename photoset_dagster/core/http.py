"""HTTP plumbing shared by the photo-list client and the downloader: one pooled client, URL policy,
and a bounded retry loop with exponential backoff that honours ``Retry-After``.

Failures fall in two groups. *Transient* ones (timeouts, dropped connections, truncated bodies and
the statuses in :data:`TRANSIENT_STATUS`) are worth another attempt; callers signal them by raising
:class:`TransientError` from the operation they hand to :func:`call_with_retries`. Anything else is
final and propagates at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# Transport failures that a later attempt may not hit. Deliberately not the whole of
# httpx.TransportError: UnsupportedProtocol, ProxyError and LocalProtocolError never heal by waiting.
_TRANSIENT_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # attempts = retries + 1
    backoff_base_s: float = 1.0  # delay for attempt n (0-based) = min(cap, base * 2**n)
    backoff_cap_s: float = 60.0
    max_total_wait_s: float = 300.0  # give up when the next sleep would push the summed sleeps past this

    @property
    def attempts(self) -> int:
        return self.retries + 1


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or unparsable.

    A date in the past means "now" (0.0): the result is never negative.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except ValueError:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate gives a naive datetime for "-0000"
        when = when.replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
    """Seconds to sleep after failed attempt ``attempt`` (0-based).

    Exponential backoff capped at ``backoff_cap_s``. A server's ``Retry-After`` wins when it is longer,
    even beyond the cap: retrying earlier than the server asked only earns another refusal. The
    overall bound is :func:`call_with_retries`' job: it gives up rather than sleep past
    ``max_total_wait_s``.
    """
    backoff = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0**attempt)
    return backoff if retry_after is None else max(backoff, retry_after)


class TransientError(Exception):
    """A failure worth another attempt; carries the server's ``Retry-After`` (seconds) when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HttpStatusError(Exception):
    """A final, non-retryable HTTP status (e.g. 404)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class RetriesExhausted(Exception):
    """Every allowed attempt failed transiently, or waiting longer would exceed the retry budget."""

    def __init__(self, last_error: TransientError, attempts: int, why: str) -> None:
        super().__init__(f"{last_error} (gave up after {attempts} attempt(s): {why})")
        self.last_error = last_error
        self.attempts = attempts


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None],
    on_retry: Callable[[TransientError, int, float], None] | None = None,
) -> T:
    """Run ``operation`` until it returns, retrying on :class:`TransientError` with backoff.

    ``on_retry(error, attempt_number, delay_s)`` is called before each sleep (for logging). Raises
    :class:`RetriesExhausted` when attempts run out or the next sleep would take the summed sleeps
    past ``policy.max_total_wait_s``; any other exception from ``operation`` propagates unchanged.
    """
    waited = 0.0
    attempt = 0
    while True:
        try:
            return operation()
        except TransientError as error:
            if attempt == policy.retries:
                raise RetriesExhausted(error, attempt + 1, "no attempts left") from error
            delay = retry_delay(policy, attempt, error.retry_after)
            if waited + delay > policy.max_total_wait_s:
                why = f"waiting {delay:g}s more would exceed the {policy.max_total_wait_s:g}s retry budget"
                raise RetriesExhausted(error, attempt + 1, why) from error
            if on_retry is not None:
                on_retry(error, attempt + 1, delay)
            sleep(delay)
            waited += delay
            attempt += 1


def raise_for_status(response: httpx.Response) -> None:
    """:class:`TransientError` for :data:`TRANSIENT_STATUS`, :class:`HttpStatusError` for any other non-2xx."""
    if response.is_success:
        return
    if response.status_code in TRANSIENT_STATUS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientError(f"HTTP {response.status_code}", retry_after=retry_after)
    raise HttpStatusError(response.status_code)


@contextlib.contextmanager
def transient_transport_errors() -> Iterator[None]:
    """Re-raise timeouts, connection errors and truncated bodies as :class:`TransientError`."""
    try:
        yield
    except _TRANSIENT_TRANSPORT_ERRORS as error:
        raise TransientError(describe_error(error)) from error


def describe_error(error: BaseException) -> str:
    """``"ReadTimeout: timed out"``: httpx messages alone are sometimes empty or ambiguous."""
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class UrlPolicyError(ValueError):
    """A download URL this project refuses to fetch."""


def check_download_url(url: object, *, allow_http: bool) -> str:
    """Return ``url`` if it may be fetched: https (or http when ``allow_http``) with a host."""
    if not isinstance(url, str):
        raise UrlPolicyError(f"url is not a string ({type(url).__name__})")
    shown = short_repr(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise UrlPolicyError(f"url {shown} is malformed: {error}") from None
    allowed = ("https", "http") if allow_http else ("https",)
    if parsed.scheme not in allowed:
        raise UrlPolicyError(f"url {shown} has scheme {parsed.scheme!r}; only {' or '.join(allowed)} allowed")
    if not parsed.host:
        raise UrlPolicyError(f"url {shown} has no host")
    return url


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters so hostile input cannot flood logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_client(
    *, timeout_s: float = 30.0, user_agent: str = "photoset/0.1", max_connections: int = 16
) -> httpx.Client:
    """One pooled client for pages and downloads; size ``max_connections`` to the download concurrency."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        headers={"User-Agent": user_agent},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=True,
    )
