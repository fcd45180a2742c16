"""Fixtures for the model area: tiny real models built once per session, CPU settings that load them
by path through the production loaders, and a loopback caption server for the HTTP backends."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from photoset_dagster.demo.tiny_models import TinyModels, build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The four tiny model folders (about 25 MB, ~3 s to build), shared by the whole session."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@dataclass(frozen=True)
class TinySettings:
    """Production settings classes pointed at the tiny folders, on CPU in float32 (bf16 is slow on CPU)."""

    dinov3: Any
    caption: Any
    vae: Any
    t5: Any


@pytest.fixture
def tiny_settings(tiny_models: TinyModels) -> TinySettings:
    from photoset_dagster.models.captioner import CaptionSettings
    from photoset_dagster.models.dinov3 import Dinov3Settings
    from photoset_dagster.models.flux_vae import FluxVaeSettings
    from photoset_dagster.models.t5 import T5Settings

    cpu = {"device": "cpu", "dtype": "float32", "batch_size": 4}
    return TinySettings(
        dinov3=Dinov3Settings(model_id=str(tiny_models.dinov3), **cpu),
        caption=CaptionSettings(model_id=str(tiny_models.gemma), max_new_tokens=8, **cpu),
        # "original" keeps test images at their own small size: VAE cost grows with pixels.
        vae=FluxVaeSettings(model_id=str(tiny_models.flux), input_mode="original", **cpu),
        t5=T5Settings(model_id=str(tiny_models.t5), **cpu),
    )


@dataclass
class Reply:
    """What the loopback server answers to one request."""

    status: int = 200
    body: Any = None  # JSON-encoded unless already str
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: Any


class CaptionServer:
    """A threaded HTTP server on 127.0.0.1 that answers queued replies, then ``default(request)``."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.replies: deque[Reply] = deque()
        self.default: Callable[[ReceivedRequest], Reply] = lambda request: Reply(404, {"error": "no reply queued"})
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def _answer(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            reply = self.replies.popleft() if self.replies else None
        return reply or self.default(request)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ReceivedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw))
                reply = server._answer(request)
                try:
                    time.sleep(reply.delay_s)
                    payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                    data = payload.encode()
                    self.send_response(reply.status)
                    for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    server._done()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> CaptionServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def caption_server() -> Iterator[CaptionServer]:
    with CaptionServer() as server:
        yield server
