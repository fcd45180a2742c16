"""Image captions from Gemma 3: in-process (transformers), or through an Ollama or OpenAI-compatible server.

The original's users moved captioning from in-process Gemma to a network Ollama server (to free VRAM),
so the backend is a setting. Every backend returns one entry per image: the normalised caption, or a
CaptionError with the reason. An empty caption is an error, never ``""`` (the seed stored ``""`` for a
failed request and later paired it with a stale T5 mask, bug B3). The HTTP backends also stream
(``caption_stream``): a server like vLLM batches whatever is in flight, so dozens of requests are
kept in flight continuously rather than one batch at a time.
"""

from __future__ import annotations

import base64
import io
import os
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import httpx
from PIL import Image

from ..core.artefacts import Recipe, text_hash
from ..core.http import (
    HttpStatusError,
    RetriesExhausted,
    RetryPolicy,
    call_with_retries,
    raise_for_status,
    transient_transport_errors,
)
from .common import ModelSettings, guarded_load

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

K = TypeVar("K", bound=Hashable)

MODEL_ENV_VAR = "PHOTOSET_CAPTION_MODEL"

# The seed's prompt, verbatim (identical in every version of the original script).
CAPTION_PROMPT = (
    "Generate a single, dense paragraph describing this image for a text-to-image training dataset. "
    "Write in a strictly dry, objective, and descriptive tone. Do not use flowery language, subjective "
    "interpretations, or lists. Describe only what is visible: subject (including specific body build, "
    "muscle definition, skin texture, and visible anatomical landmarks), precise pose (mechanics of limb "
    "positioning, hand placement), clothing/accessories, lighting, background, composition/framing, and "
    "camera angle. Do not guess measurements (height, weight) or internal anatomy not visible. Do not "
    "include any conversational filler, preambles (like 'The image shows...'), or meta-commentary. Start "
    "the description immediately."
)

Backend = Literal["transformers", "ollama", "openai"]
_JPEG_QUALITY = 95  # the seed sent Pillow's default 75; captions should not describe JPEG artefacts
# Images encoded ahead of a free request slot (HTTP backends): a finished request is replaced at
# once, and no more than concurrency + this many encoded images wait in memory.
ENCODE_AHEAD = 8


class CaptionError(RuntimeError):
    """No usable caption for one image; the message says why."""


def normalise_caption(text: str) -> str:
    """One paragraph: the seed's ensure_single_paragraph, plus dropping an echoed ``model`` turn header."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip()
    text = text.removeprefix("model\n")
    lines = [line for line in text.split("\n") if line.strip()]
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


class Captioner(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str | CaptionError]:
        """One entry per image, in order: the caption, or a CaptionError. A batch that fails as a
        whole (out of memory, a bad image) raises, so the caller can retry its images one by one."""
        ...

    def stats(self) -> dict[str, Any]:
        """Throughput so far (see :class:`CaptionStats`), for the run's metadata."""
        ...


@runtime_checkable
class StreamingCaptioner(Captioner, Protocol):
    def caption_stream(self, items: Iterable[tuple[K, Image.Image]]) -> Iterator[tuple[K, str | CaptionError]]:
        """``(key, caption or CaptionError)`` for every item, in completion order; items are pulled
        lazily, in the caller's thread."""
        ...


@dataclass(frozen=True)
class CaptionSettings(ModelSettings):
    # bfloat16: Gemma 3 was trained in it and overflows float16. Not part of the caption recipe: how the
    # model is served (backend, and so its precision) is recorded in each caption instead.
    DEFAULT_DTYPE: ClassVar[str] = "bfloat16"

    model_id: str = "google/gemma-3-27b-it"
    dtype: str = DEFAULT_DTYPE
    backend: Backend = "transformers"
    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = 500
    do_sample: bool = False
    temperature: float = 0.0
    ollama_host: str = "http://localhost:11434"
    ollama_model: str = "gemma3:27b"
    openai_base_url: str = "http://localhost:8000/v1"
    openai_model: str = "google/gemma-3-27b-it"
    openai_api_key: str | None = field(default=None, repr=False)  # never printed with the settings
    # Requests in flight (HTTP backends). vLLM batches whatever is in flight, so it needs dozens to
    # reach its token-rate ceiling. Ollama serves OLLAMA_NUM_PARALLEL at a time and queues the rest
    # (the queue counts against timeout_s): set this to that number there.
    concurrency: int = 64
    timeout_s: float = 300.0
    retries: int = 2
    retry_backoff_s: float = 1.0  # first retry's wait; doubles per attempt (a server's Retry-After wins if longer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("transformers", "ollama", "openai"):
            raise ValueError(f"unknown caption backend {self.backend!r}; expected transformers, ollama or openai")
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError("concurrency must be at least 1 and retries at least 0")

    @property
    def model_name(self) -> str:
        """The model as the chosen backend names it."""
        return {"transformers": self.model_id, "ollama": self.ollama_model, "openai": self.openai_model}[self.backend]

    @property
    def sampling_temperature(self) -> float:
        """0 when not sampling, so HTTP backends decode greedily like ``do_sample=False`` in-process."""
        return self.temperature if self.do_sample else 0.0

    def recipe(self) -> Recipe:
        """Kind "captions". The backend, its precision and the input mode are recorded in each caption,
        not here: serving the same model from vLLM instead of in-process, or showing it the whole image
        instead of the bucket crop, must not invalidate tens of thousands of expensive captions."""
        return Recipe(
            "captions",
            {
                "model": self.model_name,
                "revision": self.revision if self.backend == "transformers" else None,
                "prompt_sha256": text_hash(self.prompt),
                "max_new_tokens": self.max_new_tokens,
                "do_sample": self.do_sample,
                "temperature": self.sampling_temperature,
            },
        )

    def load(self) -> Captioner:
        if self.backend == "transformers":
            return guarded_load("captioner", "caption", self.model_id, MODEL_ENV_VAR, self._load_transformers)
        captioner_class = OllamaCaptioner if self.backend == "ollama" else OpenAICaptioner
        return guarded_load("captioner", "caption", self.model_name, MODEL_ENV_VAR, lambda: captioner_class(self))

    def _load_transformers(self) -> TransformersCaptioner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device, dtype = self.torch_device(), self.torch_dtype()
        processor = AutoProcessor.from_pretrained(self.model_id, revision=self.revision)
        model = AutoModelForImageTextToText.from_pretrained(self.model_id, revision=self.revision, dtype=dtype)
        return TransformersCaptioner(model.to(device).eval(), processor, self)


class CaptionStats:
    """What a captioner has done so far, for the run's metadata; safe to update from many threads.

    Wall time counts while a batch or stream is running; in-flight depth is in images (one per HTTP
    request, the batch size in-process), its mean weighted by time over that wall time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = self._retries = self._images = self._failed = self._tokens = 0
        self._running = 0  # batches or streams under way
        self._running_since = 0.0
        self._wall_s = 0.0
        self._depth = self._max_depth = 0
        self._depth_since = 0.0
        self._depth_seconds = 0.0  # the integral of depth over time

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._running_since = time.perf_counter()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._wall_s += time.perf_counter() - self._running_since

    @contextmanager
    def in_flight(self, images: int = 1) -> Iterator[None]:
        """One request (an HTTP attempt, or an in-process batch of ``images``)."""
        self._add_depth(images, requests=1)
        try:
            yield
        finally:
            self._add_depth(-images)

    def retried(self) -> None:
        with self._lock:
            self._retries += 1

    def settled(self, result: str | CaptionError, completion_tokens: int | None) -> None:
        with self._lock:
            self._images += 1
            self._failed += isinstance(result, CaptionError)
            self._tokens += completion_tokens or 0

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            now = time.perf_counter()
            wall = self._wall_s + (now - self._running_since if self._running else 0.0)
            depth_seconds = self._depth_seconds + self._depth * (now - self._depth_since)
            captioned = self._images - self._failed
            return {
                "requests": self._requests,
                "retries": self._retries,
                "images": self._images,
                "failed": self._failed,
                "completion_tokens": self._tokens,
                "wall_s": round(wall, 3),
                "tokens_per_s": round(self._tokens / wall, 1) if wall else 0.0,
                "images_per_s": round(captioned / wall, 2) if wall else 0.0,
                "max_in_flight": self._max_depth,
                "mean_in_flight": round(depth_seconds / wall, 1) if wall else 0.0,
            }

    def _add_depth(self, change: int, requests: int = 0) -> None:
        with self._lock:
            now = time.perf_counter()
            self._depth_seconds += self._depth * (now - self._depth_since)
            self._depth_since = now
            self._depth += change
            self._max_depth = max(self._max_depth, self._depth)
            self._requests += requests


def _checked(text: object) -> str | CaptionError:
    if not isinstance(text, str):
        return CaptionError(f"caption is not text ({type(text).__name__})")
    caption = normalise_caption(text)
    return caption if caption else CaptionError("empty caption")


class TransformersCaptioner:
    """Gemma 3 in-process: one batched, left-padded ``generate`` per call."""

    def __init__(self, model: torch.nn.Module, processor: Any, settings: CaptionSettings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self._stats = CaptionStats()
        # Decoder-only generation continues from the end of each row, so padding goes on the left.
        processor.tokenizer.padding_side = "left"
        self._generate_kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
        }
        if settings.do_sample:
            self._generate_kwargs["temperature"] = settings.temperature

    def stats(self) -> dict[str, Any]:
        return {"backend": "transformers", **self._stats.as_dict()}

    def caption(self, images: list[Image.Image]) -> list[str | CaptionError]:
        """Raises when the batch fails (out of memory included): the runner then retries each image
        alone, so one image that cannot be captioned fails only itself."""
        import torch

        prompt = {"type": "text", "text": self.settings.prompt}
        conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, prompt]}] for image in images]
        parameter = next(self.model.parameters())
        with self._stats.running(), self._stats.in_flight(len(images)):
            inputs = self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            ).to(parameter.device, dtype=parameter.dtype)  # dtype applies to floating tensors only
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self._generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        # Rows that ended early are padded to the longest; padding is not generated text.
        token_counts = (new_tokens != self.processor.tokenizer.pad_token_id).sum(dim=1).tolist()
        results = [_checked(text) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        for result, tokens in zip(results, token_counts):
            self._stats.settled(result, tokens)
        return results


class _HttpCaptioner(ABC):
    """One request per image, ``concurrency`` always in flight, bounded retries on 408/429/5xx/timeouts."""

    url: str

    def __init__(self, settings: CaptionSettings) -> None:
        self.settings = settings
        self._policy = RetryPolicy(retries=settings.retries, backoff_base_s=settings.retry_backoff_s)
        # Each worker encodes its image, then waits for one of the request slots.
        self._workers = ThreadPoolExecutor(settings.concurrency + ENCODE_AHEAD, thread_name_prefix="caption")
        self._slots = threading.BoundedSemaphore(settings.concurrency)  # requests on the wire
        # JPEG encodes at once: the first requests leave one by one instead of all after every encode.
        self._encoders = threading.BoundedSemaphore(os.cpu_count() or 1)
        # One client (one keep-alive connection) per worker thread: a client shared by dozens of
        # threads spends more CPU on its pool lock than on the requests.
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self._stats = CaptionStats()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients:
                client.close()

    def stats(self) -> dict[str, Any]:
        return {"backend": self.settings.backend, "concurrency": self.settings.concurrency, **self._stats.as_dict()}

    def caption(self, images: list[Image.Image]) -> list[str | CaptionError]:
        results = dict(self.caption_stream(enumerate(images)))
        return [results[index] for index in range(len(images))]

    def caption_stream(self, items: Iterable[tuple[K, Image.Image]]) -> Iterator[tuple[K, str | CaptionError]]:
        """``(key, caption or CaptionError)`` per item, in completion order.

        Items are pulled lazily in the caller's thread, at most ``concurrency + ENCODE_AHEAD`` ahead
        of what has been yielded. Each is encoded and sent in a worker thread; a worker whose image
        is encoded waits for one of the ``concurrency`` request slots, so a finished request is
        replaced at once and no batch ever waits for its slowest member.
        """
        limit = self.settings.concurrency + ENCODE_AHEAD
        source = iter(items)
        finished: queue.SimpleQueue[Future[tuple[K, str | CaptionError]]] = queue.SimpleQueue()
        outstanding: set[Future[tuple[K, str | CaptionError]]] = set()
        more = True
        try:
            with self._stats.running():
                while more or outstanding:
                    if more and len(outstanding) < limit:
                        item = next(source, None)
                        if item is None:
                            more = False
                        else:
                            future = self._workers.submit(self._caption_one, *item)
                            outstanding.add(future)
                            future.add_done_callback(finished.put)
                    # Hand over what has finished; block for a result only when no item can be admitted.
                    block = not (more and len(outstanding) < limit)
                    while outstanding:
                        try:
                            done = finished.get(block=block)
                        except queue.Empty:
                            break
                        outstanding.discard(done)
                        block = False
                        yield done.result()
        finally:
            # Left early (the caller stopped or failed): images not yet started are dropped; requests
            # on the wire finish in the background rather than hold the caller for up to timeout_s.
            for future in outstanding:
                future.cancel()

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            client = self._local.client = httpx.Client(timeout=httpx.Timeout(self.settings.timeout_s), limits=one)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _caption_one(self, key: K, image: Image.Image) -> tuple[K, str | CaptionError]:
        tokens = None
        try:
            with self._encoders:
                payload = self._payload(jpeg_base64(image))
            body = self._post(payload)
            tokens = self._completion_tokens(body)
            result = _checked(self._text(body))
        except CaptionError as exc:
            result = CaptionError(self._redacted(str(exc)))
        self._stats.settled(result, tokens)
        return key, result

    @abstractmethod
    def _payload(self, image_b64: str) -> dict[str, Any]:
        """The request body for one image."""

    @abstractmethod
    def _text(self, body: Any) -> object:
        """The caption inside a successful response body (raise CaptionError if absent)."""

    @abstractmethod
    def _completion_tokens(self, body: Any) -> int | None:
        """How many tokens the server generated, when the response says."""

    def _headers(self) -> dict[str, str]:
        return {}

    def _redacted(self, text: str) -> str:
        """``text`` without the API key (a server may echo it in an error body)."""
        key = self.settings.openai_api_key
        return text.replace(key, "[api key]") if key else text

    def _post(self, payload: dict[str, Any]) -> Any:
        def attempt() -> httpx.Response:
            # The slot is held for the attempt only: a request backing off leaves its slot to others.
            with self._slots, self._stats.in_flight(), transient_transport_errors():
                response = self._client().post(self.url, json=payload, headers=self._headers())
            try:
                raise_for_status(response)
            except HttpStatusError as exc:  # the server's own words say why (e.g. "model not found")
                raise CaptionError(f"{exc} from {self.url}: {response.text[:200]!r}") from exc
            return response

        try:
            response = call_with_retries(
                attempt, self._policy, sleep=time.sleep, on_retry=lambda *_: self._stats.retried()
            )
        except RetriesExhausted as exc:
            raise CaptionError(f"{self.url}: {exc}") from exc
        try:
            return response.json()
        except ValueError as exc:
            raise CaptionError(f"response from {self.url} is not JSON: {exc}") from exc


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class OllamaCaptioner(_HttpCaptioner):
    """``POST {host}/api/generate`` with the image as base64 JPEG; the caption is ``response``."""

    def __init__(self, settings: CaptionSettings) -> None:
        super().__init__(settings)
        self.url = settings.ollama_host.rstrip("/") + "/api/generate"

    def _payload(self, image_b64: str) -> dict[str, Any]:
        return {
            "model": self.settings.ollama_model,
            "prompt": self.settings.prompt,
            "images": [image_b64],
            "stream": False,
            "options": {"temperature": self.settings.sampling_temperature, "num_predict": self.settings.max_new_tokens},
        }

    def _text(self, body: Any) -> object:
        if not isinstance(body, dict) or "response" not in body:
            error = body.get("error") if isinstance(body, dict) else None
            raise CaptionError(f"Ollama returned no response field{f': {error}' if error else ''}")
        return body["response"]

    def _completion_tokens(self, body: Any) -> int | None:
        return _count(body.get("eval_count")) if isinstance(body, dict) else None


class OpenAICaptioner(_HttpCaptioner):
    """``POST {base_url}/chat/completions`` (vLLM, llama.cpp server, ...); caption = first choice's content."""

    def __init__(self, settings: CaptionSettings) -> None:
        super().__init__(settings)
        self.url = settings.openai_base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        key = self.settings.openai_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _payload(self, image_b64: str) -> dict[str, Any]:
        content = [
            {"type": "text", "text": self.settings.prompt},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image_b64}"}},
        ]
        return {
            "model": self.settings.openai_model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.settings.max_new_tokens,
            "temperature": self.settings.sampling_temperature,
        }

    def _text(self, body: Any) -> object:
        try:
            return body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise CaptionError(f"malformed chat completion (no choices[0].message.content): {exc!r}") from exc

    def _completion_tokens(self, body: Any) -> int | None:
        usage = body.get("usage") if isinstance(body, dict) else None
        return _count(usage.get("completion_tokens")) if isinstance(usage, dict) else None


def jpeg_base64(image: Image.Image) -> str:
    """The image as an HTTP backend receives it: base64 of a quality-95 JPEG; CaptionError if it cannot be."""
    buffer = io.BytesIO()
    try:
        image.convert("RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    except (OSError, ValueError) as exc:  # e.g. an empty image
        raise CaptionError(f"cannot encode the image as JPEG: {exc}") from exc
    return base64.b64encode(buffer.getvalue()).decode("ascii")
