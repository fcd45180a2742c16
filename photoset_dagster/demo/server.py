"""A real loopback HTTP server that plays the photo list and its CDN, with injectable faults.

Tests, the benchmark and the offline demo point the real client code at it::

    GET /photos.json?page=N   -> pages[N-1] as a JSON array ([] past the end; other query keys ignored)
    GET /files/<name>         -> the bytes set with set_file (404 otherwise)

A fault registered for an exact path+query answers the next ``times`` matching requests instead of
the normal response. Run ``python -m photoset_dagster.demo.server`` to serve the demo catalog.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from .catalog import load_demo

FaultKind = Literal["status", "truncate", "timeout", "garbage", "not_array"]

_JSON, _BINARY, _TEXT = "application/json", "application/octet-stream", "text/plain"
_CHUNK_BYTES = 64 * 1024
GARBAGE_BODY = b"<!doctype html><html><body>maintenance: not what you asked for</body></html>"


@dataclasses.dataclass
class Fault:
    kind: FaultKind
    status: int = 503
    retry_after: str | None = None  # Retry-After value sent with a "status" fault (seconds or HTTP-date)
    times: int = 1  # matching requests that get the fault before normal service (-1 = forever)
    delay_s: float = 2.0  # "timeout": how long to stall; keep it above the client's timeout


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

    def _stall(self, seconds: float) -> None:
        self._stopping.wait(seconds)


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
                headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
                self._send(_Reply(fault.status, f"injected HTTP {fault.status}".encode(), _TEXT, headers=headers))
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
