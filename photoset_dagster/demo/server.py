"""A real loopback HTTP server that plays the photo list and its CDN, with injectable faults.

Tests, the benchmark and the offline demo point the real client code at it::

    GET /photos.json?page=N   -> pages[N-1] as a JSON array ([] past the end; other query keys ignored)
    GET /files/<name>         -> the bytes set with set_file (404 otherwise)

A fault registered for an exact path+query answers the next ``times`` matching requests instead of
the normal response (see :class:`Fault` for the kinds). Faults that hold a connection open (stalls,
trickles) end as soon as the server stops, so a test never waits on them. Run
``python -m photoset_dagster.demo.server`` to serve the demo catalog.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from .catalog import load_demo

FaultKind = Literal[
    "status", "truncate", "timeout", "garbage", "not_array", "trickle", "trickle_headers", "stall", "redirect"
]

_JSON, _BINARY, _TEXT = "application/json", "application/octet-stream", "text/plain"
_CHUNK_BYTES = 64 * 1024
GARBAGE_BODY = b"<!doctype html><html><body>maintenance: not what you asked for</body></html>"


@dataclasses.dataclass
class Fault:
    """What to answer instead of the normal response.

    - ``status``: ``status`` (default 503) with a short text body and optional ``retry_after``
    - ``truncate``: the normal headers, half the body, then hang up
    - ``timeout``: stall ``delay_s`` before the normal response
    - ``garbage``: a 200 HTML page; ``not_array``: a 200 JSON object
    - ``trickle``: 200 headers, then the normal body (and zeros after it) one byte every
      ``interval_s`` until ``content_length`` bytes are sent, the client hangs up or the server
      stops; ``content_length=None`` sends it chunked, without a length, so it never ends
    - ``trickle_headers``: a status line and then endless header lines, one byte every ``interval_s``
    - ``stall``: the normal headers, then nothing until the server stops
    - ``redirect``: ``status`` (default 302) with ``Location: location``, any text: another path,
      the same path (a loop), ``file:///etc/passwd``
    """

    kind: FaultKind
    status: int | None = None  # "status" and "redirect": the status sent (None: the kind's default)
    retry_after: str | None = None  # Retry-After value sent with a "status" fault (seconds or HTTP-date)
    times: int = 1  # matching requests that get the fault before normal service (-1 = forever)
    delay_s: float = 2.0  # "timeout": how long to stall; keep it above the client's timeout
    interval_s: float = 0.05  # "trickle" and "trickle_headers": pause before each byte
    content_length: int | None = None  # "trickle": the Content-Length declared (None: chunked, endless)
    location: str = "/"  # "redirect": the Location header


class PhotoServer:
    def __init__(self, latency_s: float = 0.0, host: str = "127.0.0.1", *, port: int = 0) -> None:
        self.latency_s = latency_s
        self.host = host
        self._requested_port = port  # 0: any free port
        self.requests: list[str] = []
        self._pages: list[list] = []
        self._files: dict[str, _Reply] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # wakes handlers stalled by latency or a timeout fault
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> PhotoServer:
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), _Handler)
        self._httpd.app = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> PhotoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- content -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("PhotoServer is not running; call start() first")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def photos_url(self) -> str:
        return f"{self.base_url}/photos.json"

    def file_url(self, name: str) -> str:
        return f"{self.base_url}/files/{urllib.parse.quote(name, safe='')}"

    def set_pages(self, pages: list[list]) -> None:
        with self._lock:
            self._pages = [list(page) for page in pages]

    def set_file(self, name: str, body: bytes, *, chunked: bool = False) -> None:
        """Serve ``body`` at /files/<name>; ``chunked`` sends it without a Content-Length."""
        with self._lock:
            self._files[name] = _Reply(200, body, _BINARY, chunked=chunked)

    def add_fault(self, path: str, fault: Fault) -> None:
        with self._lock:  # a copy: serving counts down its ``times``, the caller's object stays as given
            self._faults.setdefault(path, []).append(dataclasses.replace(fault))

    # --- used by the handler -------------------------------------------------------------
    def _record_and_take_fault(self, path: str) -> Fault | None:
        """Log the request and consume one use of the first active fault registered for it."""
        with self._lock:
            self.requests.append(path)
            for fault in self._faults.get(path, []):
                if fault.times != 0:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _resolve(self, path: str) -> _Reply:
        """Normal service for a path+query."""
        parts = urllib.parse.urlsplit(path)
        with self._lock:
            if parts.path == "/photos.json":
                try:
                    page = int(urllib.parse.parse_qs(parts.query)["page"][0])
                except (KeyError, ValueError):
                    return _Reply(400, b'{"error": "page must be an integer"}', _JSON)
                body = self._pages[page - 1] if 1 <= page <= len(self._pages) else []
                return _Reply(200, json.dumps(body).encode(), _JSON)
            if parts.path.startswith("/files/"):
                reply = self._files.get(urllib.parse.unquote(parts.path.removeprefix("/files/")))
                if reply is not None:
                    return reply
        return _Reply(404, b"not found", _TEXT)

    def _stall(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: until the server stops); True once the server is stopping."""
        return self._stopping.wait(seconds)


@dataclasses.dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str
    chunked: bool = False  # Transfer-Encoding: chunked instead of a Content-Length
    headers: tuple[tuple[str, str], ...] = ()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must not keep the process (or stop()) waiting
    request_queue_size = 128  # socketserver's 5 drops bursts of connects, costing clients a 1 s SYN retry
    app: PhotoServer

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # clients hanging up mid-response (refused or timed-out downloads) is routine here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server: _HTTPServer

    def do_GET(self) -> None:
        app = self.server.app
        if app.latency_s:
            app._stall(app.latency_s)
        fault = app._record_and_take_fault(self.path)
        try:
            if fault is None:
                self._send(app._resolve(self.path))
            elif fault.kind == "status":
                status = fault.status or 503
                headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
                self._send(_Reply(status, f"injected HTTP {status}".encode(), _TEXT, headers=headers))
            elif fault.kind == "redirect":
                self._send(_Reply(fault.status or 302, b"", _TEXT, headers=(("Location", fault.location),)))
            elif fault.kind == "trickle":
                self._send_trickle(app._resolve(self.path), fault)
            elif fault.kind == "trickle_headers":
                self._send_endless_headers(fault)
            elif fault.kind == "stall":
                self._send_headers_then_stall(app._resolve(self.path))
            elif fault.kind == "truncate":
                self._send_truncated(app._resolve(self.path))
            elif fault.kind == "timeout":
                app._stall(fault.delay_s)
                self._send(app._resolve(self.path))
            elif fault.kind == "garbage":
                self._send(_Reply(200, GARBAGE_BODY, "text/html"))
            else:  # "not_array": valid JSON of the wrong shape
                self._send(_Reply(200, b'{"photos": []}', _JSON))
        except OSError:  # the client gave up first (e.g. it timed out)
            self.close_connection = True

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if reply.chunked:
            for start in range(0, len(reply.body), _CHUNK_BYTES):
                piece = reply.body[start : start + _CHUNK_BYTES]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(reply.body)

    def _send_truncated(self, reply: _Reply) -> None:
        """Promise the whole body, send half of it, then hang up: a connection dropped mid-transfer."""
        self.close_connection = True
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body[: len(reply.body) // 2])

    def _send_trickle(self, reply: _Reply, fault: Fault) -> None:
        """One byte every ``fault.interval_s``: each read gets data long before any read timeout."""
        app = self.server.app
        chunked = fault.content_length is None
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", reply.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(fault.content_length))
        self.end_headers()
        source = itertools.chain(reply.body, itertools.repeat(0))  # the real head, so it looks like an image
        sent = 0
        while (chunked or sent < fault.content_length) and not app._stall(fault.interval_s):
            byte = bytes([next(source)])
            self.wfile.write(b"1\r\n%s\r\n" % byte if chunked else byte)
            sent += 1

    def _send_endless_headers(self, fault: Fault) -> None:
        """A response that never gets past its headers, though a byte arrives long before any read timeout."""
        self.close_connection = True
        head = itertools.chain(b"HTTP/1.1 200 OK\r\n", itertools.cycle(b"X-Padding: 0\r\n"))
        while not self.server.app._stall(fault.interval_s):
            self.wfile.write(bytes([next(head)]))

    def _send_headers_then_stall(self, reply: _Reply) -> None:
        self.close_connection = True
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.server.app._stall(None)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests and benchmarks read ``PhotoServer.requests`` instead."""


def main(argv: list[str] | None = None) -> None:
    """Serve the demo catalog on loopback until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--page-size", type=int, default=10)
    args = parser.parse_args(argv)
    with PhotoServer(latency_s=args.latency_ms / 1000, port=args.port) as server:
        photos = load_demo(server, page_size=args.page_size)
        print(f"serving {len(photos)} demo photos (plus bad items) at {server.photos_url}; Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
