"""Resources: the pipeline's configuration and one lazily-loaded model per family.

Their values come from the project's settings (``defs.settings``: defaults, ``photoset.toml``, its
active profile, ``PHOTOSET_*`` variables), the same in every process; every field can still be
overridden per run from the launchpad or run config.
"""

import dataclasses
import gc
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import dagster as dg
from pydantic import PrivateAttr

from ..core.download import Downloader
from ..core.http import RetryPolicy, make_client
from ..core.layout import DataLayout
from ..models.captioner import CaptionSettings
from ..models.dinov3 import Dinov3Settings
from ..models.flux_vae import FluxVaeSettings
from ..models.t5 import T5Settings
from .settings import MODELS_SECTION, ConfigError, EffectiveSettings, load_settings


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
    # A download slower than this on average (after the grace period) is cut as "too slow": no server
    # can hold a worker, or the sync, forever. The per-attempt bound is timeout + size / this rate.
    min_download_kib_s: float = 16.0
    download_grace_s: float = 10.0
    page_timeout_s: float = 120.0  # one photo-list page, its retries aside
    user_agent: str = "photoset/0.1 (+approved-photo-sync)"
    prune_max_fraction: float = 0.10
    jsonl_backups: int = 3
    # Refuse a pass, migrate or shards that would leave less free disk than this (the seed's floor).
    min_free_gb: float = 20.0
    # Images whose DINOv3 vectors are this similar (cosine) form a near-duplicate cluster.
    near_duplicate_threshold: float = 0.95
    # Pack only one image per near-duplicate cluster into the shards (nothing is ever deleted).
    exclude_near_duplicates: bool = False
    report_note: str = ""  # a line shown at the top of the dataset report

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

    def downloader(self, client) -> Downloader:
        return Downloader(
            client,
            self.retry_policy,
            concurrency=self.download_concurrency,
            max_bytes=self.max_file_bytes,
            allow_http=self.allow_http,
            header_timeout_s=self.timeout_s,
            min_rate_bps=self.min_download_kib_s * 1024,
            rate_grace_s=self.download_grace_s,
        )


def _default(settings_class: type, name: str) -> Any:
    """A model resource's default is its settings dataclass's default: one place to change it."""
    return next(f.default for f in dataclasses.fields(settings_class) if f.name == name)


class _ModelResource(dg.ConfigurableResource):
    """Shared lifecycle: the model loads on first use (so a run that needs no work loads nothing)
    and is released when the run ends."""

    model_id: str
    revision: str | None = None
    # "auto": a free device of ``devices`` (default: every visible GPU), else the CPU; or "cuda:1", "cpu".
    device: str = "auto"
    # Devices a run may lease when ``device`` is "auto" or "cuda" (e.g. ["cuda:0", "cuda:1"]); each run
    # owns one until it ends. Empty: every GPU this process sees.
    devices: list[str] = []
    # The compute dtype (part of the recipe: changing it recomputes exactly that stage); "auto" is the
    # family's measured default (models/*.py: DINOv3 float32, VAE bfloat16, T5 float16).
    dtype: str = "auto"
    batch_size: int = 8

    _model: Any = PrivateAttr(default=None)

    settings_class: ClassVar[type]

    @property
    def runs_locally(self) -> bool:
        """Whether this model computes in this process (and so needs the gpu slot and a device)."""
        return True

    def settings(self, device: str | None = None):
        """The family's settings dataclass, from this resource's fields of the same names."""
        cls = self.settings_class
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name in type(self).model_fields}
        if device is not None:
            values["device"] = device
        return cls(**values)

    def get(self, device: str | None = None):
        """The model, loaded on first use (on ``device`` when given: the one this run leased)."""
        if self._model is None:
            self._model = self.settings(device).load()
        return self._model

    @property
    def loaded(self) -> Any:
        return self._model

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.unload()

    def unload(self) -> None:
        """Let the loaded model go: its threads and connections, and its GPU memory now, not at the end of
        the run (the run's device may go to another run first)."""
        if self._model is None:
            return
        close = getattr(self._model, "close", None)
        if callable(close):  # an HTTP captioner's worker threads and keep-alive connections
            close()
        self._model = None
        import torch

        if torch.cuda.is_available():  # give the GPU memory back now (a full collection: ~0.3 s)
            gc.collect()
            torch.cuda.empty_cache()


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
    # The *name* of the variable holding the API key: the key itself is read when the model loads,
    # so it never sits in run config, the launchpad, logs or the UI.
    openai_api_key_env: str = "PHOTOSET_OPENAI_API_KEY"
    concurrency: int = _default(CaptionSettings, "concurrency")
    timeout_s: float = _default(CaptionSettings, "timeout_s")
    input_mode: Literal["bucket", "original"] = "bucket"
    batch_size: int = 4

    settings_class: ClassVar[type] = CaptionSettings

    @property
    def runs_locally(self) -> bool:
        return self.backend == "transformers"

    def settings(self, device: str | None = None):
        settings = super().settings(device)
        key = os.environ.get(self.openai_api_key_env) if self.backend == "openai" else None
        return dataclasses.replace(settings, openai_api_key=key) if key else settings


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


RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {
    "photoset": PhotosetConfig,
    "dinov3": Dinov3Model,
    "captioner": CaptionModel,
    "flux_vae": FluxVaeModel,
    "t5": T5Model,
}
MODEL_RESOURCE_KEYS = ("dinov3", "captioner", "flux_vae", "t5")


def resources_from_settings(settings: EffectiveSettings) -> dict[str, dg.ConfigurableResource]:
    """Every resource, configured from the effective settings (file, profile, environment)."""
    shared = {name: value for name, value in settings.section(MODELS_SECTION).items()
              if settings.sources[f"{MODELS_SECTION}.{name}"] != "default"}
    resources = {}
    for key, cls in RESOURCE_CLASSES.items():
        values = settings.section(key)
        if key in MODEL_RESOURCE_KEYS:  # models.<field> applies where the model's own setting is unset
            values.update({name: value for name, value in shared.items() if settings.sources[f"{key}.{name}"] == "default"})
        try:
            resources[key] = cls(**values)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"invalid {key} settings: {_first_error(error)}") from error
    return resources


def resources_from_env(env: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """Resources from the settings file and ``env`` (the process environment by default)."""
    return resources_from_settings(load_settings(env))


def _first_error(error: Exception) -> str:
    details = getattr(error, "errors", None)
    if callable(details):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" for d in details())
    return str(error)
