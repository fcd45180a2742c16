"""A loopback OpenAI-compatible caption server that schedules like vLLM, for tests, benches and demos.

vLLM decodes all running requests together, one token each per step: a step takes a little longer
the more requests share it, and the GPU's throughput caps the tokens per second they share. This
server models that with no model at all:

- a request waits ``prefill_s`` (its prompt and image), then joins the running batch;
- a step for n running requests takes ``max(step_s + n * step_growth_s, n / ceiling_tokens_per_s)``:
  alone a request streams ``1 / step_s`` tokens/s, its latency grows slowly with n, and together
  they never exceed the ceiling. Client-side gaps (too few requests in flight, a batch waiting for
  its slowest member) show up as tokens/s below the ceiling;
- a request generates a length fixed by its image (a hash), capped by its ``max_tokens``, and
  answers with ``usage.completion_tokens`` as vLLM does.

Real HTTP/1.1 with keep-alive on 127.0.0.1, on asyncio and the standard library: one thread serves
hundreds of concurrent connections. ``script`` lets a test answer chosen requests otherwise (a 503
with Retry-After, a permanent 400, a longer caption).

  python -m photoset_dagster.demo.caption_server --port 8000    # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from PIL import Image

_MAX_BODY_BYTES = 64 * 1024 * 1024
_IMAGE_PROMPT_TOKENS = 256  # Gemma 3's tokens per image, for usage.prompt_tokens
_WORDS = (
    "a person stands in soft window light against a plain wall, weight on one leg, arms relaxed at the "
    "sides, wearing a grey cotton shirt and dark trousers, photographed straight on at chest height"
).split()


@dataclass(frozen=True)
class EngineModel:
    """The simulated engine's timing (defaults: a ceiling that 64 requests in flight reach, 4 do not)."""

    ceiling_tokens_per_s: float = 2000.0  # decode throughput at saturation, shared by all running requests
    step_s: float = 0.02  # one decode step with a single request running (50 tokens/s alone)
    step_growth_s: float = 0.0001  # added to a step per running request: latency grows slowly
    prefill_s: float = 0.05  # before a request's first token
    min_tokens: int = 60  # caption lengths, spread over this range by image
    max_tokens: int = 140

    def __post_init__(self) -> None:
        if self.ceiling_tokens_per_s <= 0 or self.step_s <= 0 or self.step_growth_s < 0 or self.prefill_s < 0:
            raise ValueError("the ceiling and step time must be positive, growth and prefill not negative")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")

    def step_time(self, running: int) -> float:
        """Seconds for one decode step with ``running`` requests in the batch."""
        return max(self.step_s + running * self.step_growth_s, running / self.ceiling_tokens_per_s)


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions request as ``script`` sees it."""

    body: Mapping[str, Any]
    headers: Mapping[str, str]  # lower-case names
    image: bytes  # the decoded image of the data URL
    image_key: str  # a hash of the image: stable across retries
    attempt: int  # 1 for the first request carrying this image, 2 for its first retry, ...

    def image_size(self) -> tuple[int, int]:
        return Image.open(io.BytesIO(self.image)).size


@dataclass(frozen=True)
class Scripted:
    """How to answer a request instead of the default: an error status, or a chosen caption length."""

    status: int = 200
    tokens: int | None = None  # with 200: generate this many tokens
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # with an error status (default: an OpenAI-style error object)


Script = Callable[[ChatRequest], "Scripted | None"]


@dataclass(frozen=True)
class ServerStats:
    requests: int  # chat-completion requests received, errors included
    completions: int
    completion_tokens: int
    max_running: int  # requests decoding in one batch at once
    mean_running: float  # time-weighted, over busy_s
    busy_s: float  # first request to last completion
    tokens_per_s: float  # completion tokens over busy_s


@dataclass
class _Sequence:
    tokens: int
    remaining: float
    done: asyncio.Future[None]


class _Engine:
    """Continuous batching on a virtual clock: between two events (a join, a finish) every running
    request advances at the rate the batch size allows, so progress is exact however late the event
    loop wakes up."""

    def __init__(self, model: EngineModel, lock: threading.Lock) -> None:
        self.model = model
        self._lock = lock  # guards the figures below, which stats() reads from another thread
        self._running: list[_Sequence] = []
        self._wake = asyncio.Event()
        self._clock = time.perf_counter()
        self.completions = self.tokens = self.max_running = 0
        self.running_seconds = 0.0
        self.first_arrival: float | None = None
        self.last_finish: float | None = None

    async def generate(self, tokens: int) -> None:
        with self._lock:
            if self.first_arrival is None:
                self.first_arrival = time.perf_counter()
        await asyncio.sleep(self.model.prefill_s)
        sequence = _Sequence(tokens, float(tokens), asyncio.get_running_loop().create_future())
        self._advance()
        self._running.append(sequence)
        with self._lock:
            self.max_running = max(self.max_running, len(self._running))
        self._wake.set()
        await sequence.done

    async def run(self) -> None:
        while True:
            self._wake.clear()
            self._advance()
            if not self._running:
                await self._wake.wait()
                continue
            rate = 1.0 / self.model.step_time(len(self._running))
            next_finish = min(sequence.remaining for sequence in self._running) / rate
            try:  # until the next finish, or earlier if a request joins (the rate changes)
                await asyncio.wait_for(self._wake.wait(), timeout=max(next_finish, 1e-4))
            except TimeoutError:
                pass

    def _advance(self) -> None:
        now = time.perf_counter()
        while self._running:
            rate = 1.0 / self.model.step_time(len(self._running))
            until_finish = min(sequence.remaining for sequence in self._running) / rate
            step = min(now - self._clock, until_finish)
            for sequence in self._running:
                sequence.remaining -= step * rate
            with self._lock:
                self.running_seconds += step * len(self._running)
            self._clock += step
            if step < until_finish:
                break
            for sequence in [s for s in self._running if s.remaining <= 1e-9]:
                self._running.remove(sequence)
                sequence.done.set_result(None)
                with self._lock:
                    self.completions += 1
                    self.tokens += sequence.tokens
                    self.last_finish = self._clock
        self._clock = now


class ContinuousBatchingServer:
    """The server on 127.0.0.1 in a background thread; a context manager. ``url`` is the OpenAI base URL."""

    def __init__(
        self,
        model: EngineModel | None = None,
        *,
        api_key: str | None = None,
        script: Script | None = None,
        model_name: str = "google/gemma-3-27b-it",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.model = model or EngineModel()
        self._api_key = api_key
        self._script = script
        self._model_name = model_name
        self._address = (host, port)
        self._lock = threading.Lock()
        self._requests = 0
        self._attempts: Counter[str] = Counter()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="caption-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._engine: _Engine | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ContinuousBatchingServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def stats(self) -> ServerStats:
        engine = self._engine
        assert engine is not None, "the server is not running"
        with self._lock:
            start, end = engine.first_arrival, engine.last_finish
            busy = end - start if start is not None and end is not None else 0.0
            return ServerStats(
                requests=self._requests,
                completions=engine.completions,
                completion_tokens=engine.tokens,
                max_running=engine.max_running,
                mean_running=round(engine.running_seconds / busy, 1) if busy else 0.0,
                busy_s=round(busy, 3),
                tokens_per_s=round(engine.tokens / busy, 1) if busy else 0.0,
            )

    # --- the event loop's side --------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits in __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._engine = _Engine(self.model, self._lock)
        handlers: set[asyncio.Task[None]] = set()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                pass  # the server is stopping; a cancelled handler would be logged as an error
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(connection, *self._address, backlog=1024)
        self._address = server.sockets[0].getsockname()[:2]
        engine = asyncio.create_task(self._engine.run())
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        engine.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                request_line = await reader.readline()
                if not request_line.strip():
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length > _MAX_BODY_BYTES:
                    await _send(writer, 413, {}, _error("request body too large"), close=True)
                    return
                body = await reader.readexactly(length)
                status, extra, payload = await self._route(method, path, headers, body)
                await _send(writer, status, extra, payload, close=headers.get("connection", "").lower() == "close")
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away or spoke something else than HTTP/1.1
        finally:
            writer.close()

    async def _route(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Mapping[str, str], Any]:
        if method == "GET" and path in ("/health", "/v1/models"):
            return 200, {}, {"object": "list", "data": [{"id": self._model_name, "object": "model"}]}
        if method != "POST" or path != "/v1/chat/completions":
            return 404, {}, _error(f"no route for {method} {path}")
        with self._lock:
            self._requests += 1
        if self._api_key is not None and headers.get("authorization") != f"Bearer {self._api_key}":
            return 401, {}, _error("invalid API key")
        try:
            body = json.loads(raw)
            data_url = next(
                part["image_url"]["url"]
                for message in body["messages"]
                for part in message["content"]
                if isinstance(part, dict) and part.get("type") == "image_url"
            )
            image = base64.b64decode(data_url.partition(",")[2], validate=True)
        except (ValueError, KeyError, TypeError, StopIteration, binascii.Error) as exc:
            return 400, {}, _error(f"expected a chat completion with a base64 image: {type(exc).__name__}")
        key = hashlib.sha256(image).hexdigest()[:16]
        with self._lock:
            self._attempts[key] += 1
            attempt = self._attempts[key]
        scripted = self._script(ChatRequest(body, headers, image, key, attempt)) if self._script else None
        if scripted is not None and scripted.status != 200:
            return scripted.status, scripted.headers, scripted.body or _error(HTTPStatus(scripted.status).phrase)
        limit = body.get("max_tokens") or self.model.max_tokens
        own = self.model.min_tokens + int(key, 16) % (self.model.max_tokens - self.model.min_tokens + 1)
        wanted = scripted.tokens if scripted is not None and scripted.tokens is not None else own
        tokens = max(1, min(wanted, limit))
        assert self._engine is not None
        await self._engine.generate(tokens)
        words = [_WORDS[(int(key[:4], 16) + i) % len(_WORDS)] for i in range(tokens)]
        return 200, {}, {
            "id": f"chatcmpl-{key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self._model_name),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words).capitalize() + "."},
                    "finish_reason": "length" if wanted > limit else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": _IMAGE_PROMPT_TOKENS,
                "completion_tokens": tokens,
                "total_tokens": _IMAGE_PROMPT_TOKENS + tokens,
            },
        }


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


async def _send(
    writer: asyncio.StreamWriter, status: int, headers: Mapping[str, str], payload: Any, close: bool
) -> None:
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
    if close:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
    await writer.drain()


def main(argv: list[str] | None = None) -> None:
    defaults = EngineModel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ceiling", type=float, default=defaults.ceiling_tokens_per_s, help="tokens/s at saturation")
    parser.add_argument("--step-ms", type=float, default=defaults.step_s * 1000, help="one step, one request")
    parser.add_argument("--prefill-ms", type=float, default=defaults.prefill_s * 1000)
    parser.add_argument("--api-key", help="require this bearer token")
    args = parser.parse_args(argv)
    model = EngineModel(ceiling_tokens_per_s=args.ceiling, step_s=args.step_ms / 1000, prefill_s=args.prefill_ms / 1000)
    with ContinuousBatchingServer(model, api_key=args.api_key, port=args.port) as server:
        print(f"serving {server.url} (ceiling {model.ceiling_tokens_per_s:g} tokens/s); Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
