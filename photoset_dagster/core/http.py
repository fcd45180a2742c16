"""HTTP plumbing shared by the photo-list client and the downloader: one pooled client, URL policy,
deadlines on every socket operation, redirects checked hop by hop, one classification of failures,
and a bounded retry loop with exponential backoff that honours ``Retry-After``.

Every failure becomes a :class:`FetchError` with a machine-readable ``kind``. *Transient* ones
(:class:`TransientError`: timeouts, resets, truncated or too-slow bodies, 408/425/429/5xx) are worth
another attempt; :func:`call_with_retries` retries them within the :class:`RetryPolicy`. *Permanent*
ones (:class:`PermanentError`: other statuses, refused URLs and redirects, bodies too large) end the
fetch at once.

The list and the CDN are untrusted, so no server behaviour may hold a worker forever: an attempt runs
under :func:`io_deadline`, which the clients of :func:`make_client` enforce on every connect, TLS
handshake, read and write, so a server that trickles its headers or body is cut at the deadline
instead of resetting the per-read timeout with each byte.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import email.utils
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpcore
import httpx

# Why a fetch failed, for counting ("retry budget hit 3 times, 2 too slow, ...").
FailureKind = Literal[
    "http_status",  # a non-2xx answer
    "timeout",  # no answer (or no response headers) in time
    "too_slow",  # a body slower than the minimum rate, or past its deadline
    "connection_refused",  # nobody listens at the address
    "connection",  # other connection failures: DNS, reset or hang-up before the response
    "truncated",  # the body ended or broke before it was complete
    "protocol",  # a response httpx cannot use (bad encoding, ...)
    "redirect",  # a redirect to a refused or unparsable url, a loop or too long a chain
    "url_refused",  # the url itself is refused by policy
    "too_large",  # the body is over the size limit
    "bad_page",  # a photo-list page that is not a JSON array
    "not_an_image",  # a download that is not a supported image
    "disk",  # the download could not be written
]

T = TypeVar("T")


# --- failures ---------------------------------------------------------------------------------


class FetchError(Exception):
    """A failed HTTP fetch; ``kind`` says why, ``transient`` whether another attempt may succeed."""

    transient = False

    def __init__(self, message: str, *, kind: FailureKind, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After), if it did


class TransientError(FetchError):
    """A failure worth another attempt."""

    transient = True


class PermanentError(FetchError):
    """A failure that repeating will not fix."""


class HttpStatusError(PermanentError):
    """A final, non-retryable HTTP status (e.g. 404)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}", kind="http_status")
        self.status_code = status_code


class RetriesExhausted(FetchError):
    """Every allowed attempt failed transiently, or waiting longer would exceed the retry budget."""

    def __init__(self, last_error: TransientError, attempts: int, why: str) -> None:
        super().__init__(f"{last_error} (gave up after {attempts} attempt(s): {why})", kind=last_error.kind)
        self.last_error = last_error
        self.attempts = attempts


class DeadlineExceeded(TransientError):
    """The current :func:`io_deadline` passed before a socket operation could finish."""

    def __init__(self, elapsed_s: float) -> None:
        super().__init__(f"deadline passed after {elapsed_s:.1f} s", kind="timeout")


def is_transient_status(status_code: int) -> bool:
    """408 Request Timeout, 425 Too Early, 429 Too Many Requests and every 5xx: typical of an
    overloaded or restarting server, so worth another (bounded) attempt."""
    return status_code in (408, 425, 429) or 500 <= status_code <= 599


def raise_for_status(response: httpx.Response) -> None:
    """:class:`TransientError` for a transient status, :class:`HttpStatusError` for any other non-2xx."""
    if response.is_success:
        return
    if is_transient_status(response.status_code):
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientError(f"HTTP {response.status_code}", kind="http_status", retry_after=retry_after)
    raise HttpStatusError(response.status_code)


def classify(error: httpx.HTTPError | httpx.InvalidURL, *, in_body: bool = False) -> FetchError:
    """The one classification of httpx's failures, for the list client, the downloader and the captioner.

    ``in_body``: the error came while reading a body whose headers had arrived, so a broken
    connection means a truncated body rather than a failed request.
    """
    text = describe_error(error)
    if isinstance(error, httpx.TimeoutException):
        return TransientError(text, kind="timeout")
    if isinstance(error, (httpx.NetworkError, httpx.RemoteProtocolError)):  # resets, hang-ups, short bodies
        if in_body:
            return TransientError(f"body cut short: {text}", kind="truncated")
        if isinstance(error, httpx.ConnectError) and _caused_by(error, ConnectionRefusedError):
            return TransientError(text, kind="connection_refused")
        return TransientError(text, kind="connection")
    if isinstance(error, httpx.InvalidURL):
        return PermanentError(text, kind="url_refused")
    # UnsupportedProtocol, ProxyError, LocalProtocolError, DecodingError, ...: waiting heals none of them.
    return PermanentError(text, kind="protocol")


def _caused_by(error: BaseException, cause: type[BaseException]) -> bool:
    """Whether ``cause`` is in ``error``'s chain (httpx wraps httpcore, which wraps the OSError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, cause):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def transient_transport_errors() -> Iterator[None]:
    """Re-raise httpx's transient failures (timeouts, connection errors) as :class:`TransientError`;
    permanent ones propagate unchanged. For callers that send with plain httpx (the captioner)."""
    try:
        yield
    except httpx.TransportError as error:
        failure = classify(error)
        if failure.transient:
            raise failure from error
        raise


def describe_error(error: BaseException) -> str:
    """``"ReadTimeout: timed out"``: httpx messages alone are sometimes empty or ambiguous."""
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# --- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # attempts = retries + 1
    backoff_base_s: float = 1.0  # delay for attempt n (0-based) = min(cap, base * 2**n)
    backoff_cap_s: float = 60.0
    max_total_wait_s: float = 300.0  # give up when the next sleep would push the summed sleeps past this
    # A refused connection means nobody listens: a server restart is over in seconds, and a dead
    # host should not cost the full backoff (31 s with the defaults) for every one of its files.
    refused_retries: int = 2  # at most this many of the retries may follow a refused connection
    refused_delay_s: float = 0.5  # fixed delay before each of them

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


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None],
    on_retry: Callable[[TransientError, int, float], None] | None = None,
) -> T:
    """Run ``operation`` until it returns, retrying on :class:`TransientError` with backoff.

    ``on_retry(error, attempt_number, delay_s)`` is called before each sleep (for logging). Raises
    :class:`RetriesExhausted` when attempts run out (``retries``, and ``refused_retries`` for refused
    connections) or the next sleep would take the summed sleeps past ``policy.max_total_wait_s``; any
    other exception from ``operation`` propagates unchanged. So the sleeps never sum past
    ``max_total_wait_s`` and ``operation`` runs at most ``policy.attempts`` times.
    """
    waited = 0.0
    attempt = 0
    refused = 0
    while True:
        try:
            return operation()
        except TransientError as error:
            if attempt == policy.retries:
                raise RetriesExhausted(error, attempt + 1, "no attempts left") from error
            if error.kind == "connection_refused":
                if refused == policy.refused_retries:
                    why = f"refused {refused + 1} time(s)"
                    raise RetriesExhausted(error, attempt + 1, why) from error
                refused += 1
                delay = policy.refused_delay_s
            else:
                delay = retry_delay(policy, attempt, error.retry_after)
            if waited + delay > policy.max_total_wait_s:
                why = f"waiting {delay:g}s more would exceed the {policy.max_total_wait_s:g}s retry budget"
                raise RetriesExhausted(error, attempt + 1, why) from error
            if on_retry is not None:
                on_retry(error, attempt + 1, delay)
            sleep(delay)
            waited += delay
            attempt += 1


# --- deadlines --------------------------------------------------------------------------------


class Deadline:
    """A moment (``time.monotonic``) by which the current thread's socket operations must be done.

    ``at`` may be moved while the deadline is in force: the downloader moves it as bytes arrive.
    """

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.at = self.started + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(time.monotonic() - self.started)


_current_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("io_deadline", default=None)


@contextlib.contextmanager
def io_deadline(seconds: float) -> Iterator[Deadline]:
    """Bound every socket operation of this thread (connect, TLS, read, write) inside the block:
    none may run past ``seconds`` from now (or past the yielded deadline's ``at``, once moved); one
    that would raises :class:`DeadlineExceeded`. Enforced by the clients of :func:`make_client`."""
    deadline = Deadline(seconds)
    token = _current_deadline.set(deadline)
    try:
        yield deadline
    finally:
        _current_deadline.reset(token)


def _within_deadline(operation: Callable[[float | None], T], timeout: float | None) -> T:
    """``operation(timeout)`` with ``timeout`` cut to what is left of the current deadline."""
    deadline = _current_deadline.get()
    if deadline is None:
        return operation(timeout)
    remaining = deadline.remaining()
    if remaining <= 0:
        raise deadline.exceeded()
    if timeout is not None and timeout <= remaining:
        return operation(timeout)  # the operation's own timeout comes first: its error is the honest one
    try:
        return operation(remaining)
    except httpcore.TimeoutException:
        raise deadline.exceeded() from None


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _within_deadline(lambda limit: self._stream.read(max_bytes, limit), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _within_deadline(lambda limit: self._stream.write(buffer, limit), timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            _within_deadline(lambda limit: self._stream.start_tls(ssl_context, server_hostname, limit), timeout)
        )

    def get_extra_info(self, info: str) -> object:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket layer with every operation bounded by the current :func:`io_deadline`.

    httpx's timeouts bound each operation alone, so a peer sending a byte just before each read
    timeout holds the request forever; only a bound on the sum ends it.
    """

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            _within_deadline(
                lambda limit: self._backend.connect_tcp(host, port, limit, local_address, socket_options), timeout
            )
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            _within_deadline(lambda limit: self._backend.connect_unix_socket(path, limit, socket_options), timeout)
        )

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def make_client(
    *, timeout_s: float = 30.0, user_agent: str = "photoset/0.1", max_connections: int = 16
) -> httpx.Client:
    """One pooled client for pages and downloads; size ``max_connections`` to the download concurrency.

    Its sockets obey :func:`io_deadline`. It follows no redirects itself: :func:`open_response`
    does, checking each hop. (A custom transport also means httpx reads no proxy from the
    environment.)
    """
    transport = httpx.HTTPTransport(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    )
    # httpx offers no public way to give its pool a network backend; fail loudly rather than run
    # without deadlines if a new httpx/httpcore moves these attributes.
    pool = getattr(transport, "_pool", None)
    if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
        raise RuntimeError(f"cannot install socket deadlines on httpx {httpx.__version__}'s transport")
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return httpx.Client(transport=transport, timeout=httpx.Timeout(timeout_s), headers={"User-Agent": user_agent})


# --- URL policy and redirects -----------------------------------------------------------------


class UrlPolicyError(ValueError):
    """A URL this project refuses to fetch."""


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


@contextlib.contextmanager
def open_response(client: httpx.Client, url: str, *, allow_http: bool) -> Iterator[httpx.Response]:
    """GET ``url`` (already checked against the URL policy) and yield the final response, body unread.

    Redirects are followed here rather than by httpx so that each target is checked against the
    same policy *before* it is requested (an https page redirected to http is never fetched in
    plain text), and so that a loop is named as one. Failures raise classified :class:`FetchError`.
    """
    seen = {url}
    for _ in range(client.max_redirects + 1):
        request = client.build_request("GET", url, timeout=_request_timeout(client.timeout))
        try:
            response = client.send(request, stream=True, follow_redirects=False)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise classify(error) from error
        if not response.has_redirect_location:
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        url = _redirect_target(response, allow_http)
        if url in seen:
            raise PermanentError(f"redirect loop: {short_repr(url)} was already visited", kind="redirect")
        seen.add(url)
    raise PermanentError(f"more than {client.max_redirects} redirects", kind="redirect")


def _redirect_target(response: httpx.Response, allow_http: bool) -> str:
    location = response.headers["Location"]
    try:
        target = str(response.url.join(location))
    except httpx.InvalidURL as error:
        message = f"redirected to an unparsable url {short_repr(location)}: {error}"
        raise PermanentError(message, kind="redirect") from None
    try:
        return check_download_url(target, allow_http=allow_http)
    except UrlPolicyError as error:
        message = f"redirected to a refused url (Location: {short_repr(location)}): {error}"
        raise PermanentError(message, kind="redirect") from None


def _request_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """``timeout`` with the wait for a pooled connection cut to the current deadline: the one wait
    that happens outside the sockets :class:`_DeadlineBackend` bounds."""
    deadline = _current_deadline.get()
    if deadline is None:
        return timeout
    left = max(0.0, deadline.remaining())
    pool = left if timeout.pool is None else min(timeout.pool, left)
    return httpx.Timeout(connect=timeout.connect, read=timeout.read, write=timeout.write, pool=pool)


def iter_body(response: httpx.Response) -> Iterator[bytes]:
    """The decoded body as it arrives; failures raise classified :class:`FetchError`.

    A deadline passing mid-body means the server sends too slowly: ``too slow (<bytes> bytes in <s> s)``.
    """
    started = time.monotonic()
    try:
        yield from response.iter_bytes()
    except DeadlineExceeded:
        elapsed = time.monotonic() - started
        message = f"too slow ({response.num_bytes_downloaded} bytes in {elapsed:.1f} s)"
        raise TransientError(message, kind="too_slow") from None
    except httpx.HTTPError as error:
        raise classify(error, in_body=True) from error
