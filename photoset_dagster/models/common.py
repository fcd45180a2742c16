"""What the four model families share: settings, device and compute-dtype choice, guarded loading,
8-bit uploads, load counts."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from PIL import Image

from ..core.artefacts import Recipe

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

T = TypeVar("T")

# Successful loads per family ("dinov3", "captioner", "flux_vae", "t5"): tests use it to prove a
# run loads each model once, and an all-current run loads none.
LOAD_COUNTS: collections.Counter[str] = collections.Counter()

DTYPE_NAMES = ("float32", "bfloat16", "float16")


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


def resolve_dtype(name: str, default: str) -> str:
    """The concrete compute dtype ``name`` stands for; ``"auto"`` is the family's ``default``.

    Never the device's choice: the resolved name goes into the recipe, so moving a pass between
    machines with the same setting keeps every artefact current.
    """
    resolved = default if name == "auto" else name
    if resolved not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPE_NAMES)}")
    return resolved


@dataclass(frozen=True)
class ModelSettings:
    """Where a model comes from and how it runs. ``model_id``/``revision``, the compute dtype and each
    family's recipe options change an artefact's bytes; the device and the batch size do not."""

    # Each family's measured choice (see its module); what ``dtype="auto"`` means.
    DEFAULT_DTYPE: ClassVar[str] = "float32"

    model_id: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = DEFAULT_DTYPE
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        resolve_dtype(self.dtype, self.DEFAULT_DTYPE)  # a misspelt dtype fails here, not at the first batch

    @property
    def compute_dtype(self) -> str:
        """The concrete dtype the model computes in ("float32", "bfloat16" or "float16")."""
        return resolve_dtype(self.dtype, self.DEFAULT_DTYPE)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.compute_dtype)

    def _recipe(self, kind: str, **options: Any) -> Recipe:
        settings = {"model_id": self.model_id, "revision": self.revision, "dtype": self.compute_dtype}
        return Recipe(kind, {**settings, **options})


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


def pixels_on(device: torch.device, images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) uint8 on ``device`` from same-size images.

    Pixels travel as bytes and become floats on the device: a quarter of the copy, and the
    conversion is not CPU work in the thread that feeds the model.
    """
    import torch

    array = np.stack([np.asarray(image if image.mode == "RGB" else image.convert("RGB")) for image in images])
    return torch.from_numpy(array).to(device).permute(0, 3, 1, 2)
