"""Image captions from Gemma 3: in-process (transformers), or through an Ollama or OpenAI-compatible server.

The original's users moved captioning from in-process Gemma to a network Ollama server (to free VRAM),
so the backend is a setting. Every backend returns one entry per image: the normalised caption, or a
CaptionError with the reason. An empty caption is an error, never ``""`` (the seed stored ``""`` for a
failed request and later paired it with a stale T5 mask, bug B3).
"""

from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

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
        """One entry per image, in order: the caption, or a CaptionError."""
        ...


@dataclass(frozen=True)
class CaptionSettings(ModelSettings):
    model_id: str = "google/gemma-3-27b-it"
    backend: Backend = "transformers"
    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = 500
    do_sample: bool = False
    temperature: float = 0.0
    ollama_host: str = "http://localhost:11434"
    ollama_model: str = "gemma3:27b"
    openai_base_url: str = "http://localhost:8000/v1"
    openai_model: str = "google/gemma-3-27b-it"
    openai_api_key: str | None = None
    concurrency: int = 4
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
        """Kind "captions". The backend and the input mode are recorded in each caption, not here:
        serving the same model from vLLM instead of in-process, or showing it the whole image instead
        of the bucket crop, must not invalidate tens of thousands of expensive captions."""
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
        # Decoder-only generation continues from the end of each row, so padding goes on the left.
        processor.tokenizer.padding_side = "left"
        self._generate_kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
        }
        if settings.do_sample:
            self._generate_kwargs["temperature"] = settings.temperature

    def caption(self, images: list[Image.Image]) -> list[str | CaptionError]:
        prompt = {"type": "text", "text": self.settings.prompt}
        conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, prompt]}] for image in images]
        parameter = next(self.model.parameters())
        try:
            inputs = self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            ).to(parameter.device, dtype=parameter.dtype)  # dtype applies to floating tensors only
            import torch
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self._generate_kwargs)
        except Exception as exc:  # a failed batch is a per-image failure, like a failed HTTP request
            return [CaptionError(f"generation failed: {type(exc).__name__}: {exc}") for _ in images]
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [_checked(text) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


class _HttpCaptioner(ABC):
    """One request per image, ``concurrency`` in flight, bounded retries on 408/429/5xx/timeouts."""

    url: str

    def __init__(self, settings: CaptionSettings) -> None:
        self.settings = settings
        self._client = httpx.Client(timeout=httpx.Timeout(settings.timeout_s))

    def close(self) -> None:
        self._client.close()

    def caption(self, images: list[Image.Image]) -> list[str | CaptionError]:
        if not images:
            return []
        with ThreadPoolExecutor(min(self.settings.concurrency, len(images)), thread_name_prefix="caption") as pool:
            return list(pool.map(self._caption_one, images))

    def _caption_one(self, image: Image.Image) -> str | CaptionError:
        try:
            body = self._post(self._payload(_jpeg_base64(image)))
            return _checked(self._text(body))
        except CaptionError as exc:
            return exc

    @abstractmethod
    def _payload(self, image_b64: str) -> dict[str, Any]:
        """The request body for one image."""

    @abstractmethod
    def _text(self, body: Any) -> object:
        """The caption inside a successful response body (raise CaptionError if absent)."""

    def _headers(self) -> dict[str, str]:
        return {}

    def _post(self, payload: dict[str, Any]) -> Any:
        def attempt() -> httpx.Response:
            with transient_transport_errors():
                response = self._client.post(self.url, json=payload, headers=self._headers())
            try:
                raise_for_status(response)
            except HttpStatusError as exc:  # the server's own words say why (e.g. "model not found")
                raise CaptionError(f"{exc} from {self.url}: {response.text[:200]!r}") from exc
            return response

        policy = RetryPolicy(retries=self.settings.retries, backoff_base_s=self.settings.retry_backoff_s)
        try:
            response = call_with_retries(attempt, policy, sleep=time.sleep)
        except RetriesExhausted as exc:
            raise CaptionError(f"{self.url}: {exc}") from exc
        try:
            return response.json()
        except ValueError as exc:
            raise CaptionError(f"response from {self.url} is not JSON: {exc}") from exc


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


def _jpeg_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
