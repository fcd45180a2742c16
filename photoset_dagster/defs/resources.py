"""Resources: the pipeline's configuration and one lazily-loaded model per family.

Defaults come from environment variables (see README "Configuration"), read once when the
definitions load; every field can still be overridden per run from the launchpad or run config.
"""

import dataclasses
import gc
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import dagster as dg
from pydantic import PrivateAttr

from ..core.http import RetryPolicy, make_client
from ..core.layout import DataLayout
from ..models.captioner import CaptionSettings
from ..models.dinov3 import Dinov3Settings
from ..models.flux_vae import FluxVaeSettings
from ..models.t5 import T5Settings


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no)")


class PhotosetConfig(dg.ConfigurableResource):
    """Where the photo list and data live, and how politely to talk to the API/CDN."""

    data_root: str = "data"
    photos_url: str = "https://crawlr.lawrenz.com/photos.json"
    allow_http: bool = False
    timeout_s: float = 30.0
    retries: int = 5
    backoff_cap_s: float = 60.0
    max_total_wait_s: float = 300.0
    download_concurrency: int = 16
    max_file_bytes: int = 200 * 1024 * 1024
    user_agent: str = "photoset/0.1 (+approved-photo-sync)"
    prune_max_fraction: float = 0.10
    jsonl_backups: int = 3

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_root)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_cap_s=self.backoff_cap_s, max_total_wait_s=self.max_total_wait_s)

    def http_client(self):
        return make_client(
            timeout_s=self.timeout_s, user_agent=self.user_agent, max_connections=self.download_concurrency
        )


def _default(settings_class: type, name: str) -> Any:
    """A model resource's default is its settings dataclass's default: one place to change it."""
    return next(f.default for f in dataclasses.fields(settings_class) if f.name == name)


class _ModelResource(dg.ConfigurableResource):
    """Shared lifecycle: the model loads on first use (so a run that needs no work loads nothing)
    and is released when the run ends."""

    model_id: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8

    _model: Any = PrivateAttr(default=None)

    settings_class: ClassVar[type]

    def settings(self):
        """The family's settings dataclass, from this resource's fields of the same names."""
        cls = self.settings_class
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name in type(self).model_fields})

    def get(self):
        if self._model is None:
            self._model = self.settings().load()
        return self._model

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._model is None:
            return
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass


class Dinov3Model(_ModelResource):
    """DINOv3 ViT-L/16 image embeddings (CLS, optional patch tokens)."""

    model_id: str = _default(Dinov3Settings, "model_id")
    patch_tokens: bool = _default(Dinov3Settings, "patch_tokens")
    batch_size: int = 32

    settings_class: ClassVar[type] = Dinov3Settings


class CaptionModel(_ModelResource):
    """Gemma 3 captions: in-process transformers, an Ollama server, or an OpenAI-compatible server (vLLM)."""

    model_id: str = _default(CaptionSettings, "model_id")
    backend: Literal["transformers", "ollama", "openai"] = _default(CaptionSettings, "backend")
    max_new_tokens: int = _default(CaptionSettings, "max_new_tokens")
    do_sample: bool = _default(CaptionSettings, "do_sample")
    temperature: float = _default(CaptionSettings, "temperature")
    ollama_host: str = _default(CaptionSettings, "ollama_host")
    ollama_model: str = _default(CaptionSettings, "ollama_model")
    openai_base_url: str = _default(CaptionSettings, "openai_base_url")
    openai_model: str = _default(CaptionSettings, "openai_model")
    openai_api_key: str | None = _default(CaptionSettings, "openai_api_key")
    concurrency: int = _default(CaptionSettings, "concurrency")
    timeout_s: float = _default(CaptionSettings, "timeout_s")
    input_mode: Literal["bucket", "original"] = "bucket"
    batch_size: int = 4

    settings_class: ClassVar[type] = CaptionSettings


class FluxVaeModel(_ModelResource):
    """Flux VAE latents (16 x H/8 x W/8)."""

    model_id: str = _default(FluxVaeSettings, "model_id")
    subfolder: str = _default(FluxVaeSettings, "subfolder")
    latent: Literal["mode", "sample"] = _default(FluxVaeSettings, "latent")
    seed: int = _default(FluxVaeSettings, "seed")
    scaled: bool = _default(FluxVaeSettings, "scaled")
    input_mode: Literal["bucket", "original"] = _default(FluxVaeSettings, "input_mode")
    max_pixels: int = _default(FluxVaeSettings, "max_pixels")
    batch_size: int = 8

    settings_class: ClassVar[type] = FluxVaeSettings


class T5Model(_ModelResource):
    """T5-Large encoder hidden states and attention mask for each caption."""

    model_id: str = _default(T5Settings, "model_id")
    max_length: int = _default(T5Settings, "max_length")
    batch_size: int = 64

    settings_class: ClassVar[type] = T5Settings


# Environment variable -> (resource key, field). One table so the README and the code agree.
ENV_SETTINGS: dict[str, tuple[str, str]] = {
    "PHOTOSET_DATA_ROOT": ("photoset", "data_root"),
    "PHOTOSET_PHOTOS_URL": ("photoset", "photos_url"),
    "PHOTOSET_ALLOW_HTTP": ("photoset", "allow_http"),
    "PHOTOSET_TIMEOUT_S": ("photoset", "timeout_s"),
    "PHOTOSET_RETRIES": ("photoset", "retries"),
    "PHOTOSET_DOWNLOAD_CONCURRENCY": ("photoset", "download_concurrency"),
    "PHOTOSET_MAX_FILE_BYTES": ("photoset", "max_file_bytes"),
    "PHOTOSET_USER_AGENT": ("photoset", "user_agent"),
    "PHOTOSET_PRUNE_MAX_FRACTION": ("photoset", "prune_max_fraction"),
    "PHOTOSET_DEVICE": ("*", "device"),
    "PHOTOSET_DINOV3_MODEL": ("dinov3", "model_id"),
    "PHOTOSET_DINOV3_REVISION": ("dinov3", "revision"),
    "PHOTOSET_DINOV3_PATCH_TOKENS": ("dinov3", "patch_tokens"),
    "PHOTOSET_DINOV3_BATCH_SIZE": ("dinov3", "batch_size"),
    "PHOTOSET_CAPTION_BACKEND": ("captioner", "backend"),
    "PHOTOSET_CAPTION_MODEL": ("captioner", "model_id"),
    "PHOTOSET_CAPTION_REVISION": ("captioner", "revision"),
    "PHOTOSET_CAPTION_MAX_NEW_TOKENS": ("captioner", "max_new_tokens"),
    "PHOTOSET_CAPTION_BATCH_SIZE": ("captioner", "batch_size"),
    "PHOTOSET_OLLAMA_HOST": ("captioner", "ollama_host"),
    "PHOTOSET_OLLAMA_MODEL": ("captioner", "ollama_model"),
    "PHOTOSET_OPENAI_BASE_URL": ("captioner", "openai_base_url"),
    "PHOTOSET_OPENAI_MODEL": ("captioner", "openai_model"),
    "PHOTOSET_OPENAI_API_KEY": ("captioner", "openai_api_key"),
    "PHOTOSET_CAPTION_CONCURRENCY": ("captioner", "concurrency"),
    "PHOTOSET_VAE_MODEL": ("flux_vae", "model_id"),
    "PHOTOSET_VAE_REVISION": ("flux_vae", "revision"),
    "PHOTOSET_VAE_LATENT": ("flux_vae", "latent"),
    "PHOTOSET_VAE_SCALED": ("flux_vae", "scaled"),
    "PHOTOSET_VAE_INPUT_MODE": ("flux_vae", "input_mode"),
    "PHOTOSET_VAE_BATCH_SIZE": ("flux_vae", "batch_size"),
    "PHOTOSET_T5_MODEL": ("t5", "model_id"),
    "PHOTOSET_T5_REVISION": ("t5", "revision"),
    "PHOTOSET_T5_MAX_LENGTH": ("t5", "max_length"),
    "PHOTOSET_T5_BATCH_SIZE": ("t5", "batch_size"),
}

RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {
    "photoset": PhotosetConfig,
    "dinov3": Dinov3Model,
    "captioner": CaptionModel,
    "flux_vae": FluxVaeModel,
    "t5": T5Model,
}
MODEL_RESOURCE_KEYS = ("dinov3", "captioner", "flux_vae", "t5")


class ConfigError(ValueError):
    """Bad configuration: the message names the variable and what it expects."""


def env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None


def _coerce(resource_cls: type[dg.ConfigurableResource], field: str, env_name: str, raw: str) -> Any:
    annotation = resource_cls.model_fields[field].annotation
    try:
        if annotation is bool:
            return _env_bool({env_name: raw}, env_name, False)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError as error:
        raise ConfigError(f"{env_name}={raw!r}: expected {annotation.__name__}") from error
    return raw


def resources_from_env(env: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """Build every resource, taking overrides from ``PHOTOSET_*`` environment variables."""
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {key: {} for key in RESOURCE_CLASSES}
    for env_name, (key, field) in ENV_SETTINGS.items():
        raw = env.get(env_name)
        if raw is None or raw == "":
            continue
        targets = MODEL_RESOURCE_KEYS if key == "*" else (key,)
        for target in targets:
            values[target][field] = _coerce(RESOURCE_CLASSES[target], field, env_name, raw)
    try:
        return {key: cls(**values[key]) for key, cls in RESOURCE_CLASSES.items()}
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid photoset configuration: {error}") from error
