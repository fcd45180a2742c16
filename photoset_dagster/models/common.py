"""What the four model families share: settings, device/dtype choice, guarded loading, load counts."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from ..core.artefacts import Recipe

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

T = TypeVar("T")

# Successful loads per family ("dinov3", "captioner", "flux_vae", "t5"): tests use it to prove a
# run loads each model once, and an all-current run loads none.
LOAD_COUNTS: collections.Counter[str] = collections.Counter()

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the setting that fixes it."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as torch spells it ("cuda:1", "mps")."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from exc


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on cuda, float32 elsewhere (bf16 on CPU is slow and erratic)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(_DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class ModelSettings:
    """Where a model comes from and how it runs. Only ``model_id``/``revision`` (plus each family's
    recipe options) change an artefact's bytes; device, dtype and batch size do not."""

    model_id: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device())

    def _recipe(self, kind: str, **options: Any) -> Recipe:
        return Recipe(kind, {"model_id": self.model_id, "revision": self.revision, **options})


def guarded_load(family: str, label: str, model_id: str, env_var: str, load: Callable[[], T]) -> T:
    """Run ``load`` and count it; turn the ways a hub or path load fails into a ModelLoadError.

    ``label`` is the human name ("DINOv3"), ``env_var`` the setting that points at another source.
    """
    try:
        loaded = load()
    except (OSError, ValueError, ImportError, HfHubHTTPError, EntryNotFoundError) as exc:
        raise ModelLoadError(
            f"could not load {label} model {model_id!r} (set {env_var} to a local path or log in with "
            f"`hf auth login` for gated repos): {type(exc).__name__}: {exc}"
        ) from exc
    LOAD_COUNTS[family] += 1
    return loaded
