"""Flux VAE latents: (16, H/8, W/8) float16 per image."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from PIL import Image

from ..core.artefacts import Recipe
from .common import ModelSettings, guarded_load, pixels_on

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

MODEL_ENV_VAR = "PHOTOSET_VAE_MODEL"
# Flux packs latents 2x2, so a latent side must be even: image sides must be multiples of 8 * 2.
SIDE_MULTIPLE = 16


@dataclass(frozen=True)
class FluxVaeSettings(ModelSettings):
    # bfloat16: what Flux runs its autoencoder in, with float32's range. It moves latents by up to
    # 0.064 on the tiny VAE and 0.03 at full size with random weights (float16: 10x closer), but the
    # Flux VAE's config asks for an fp32 upcast under float16 (force_upcast: its activations can leave
    # float16's range), and float32 costs more GPU time (bench/gpu_passes.py's precision rows: both).
    DEFAULT_DTYPE: ClassVar[str] = "bfloat16"

    model_id: str = "black-forest-labs/FLUX.1-dev"
    dtype: str = DEFAULT_DTYPE
    subfolder: str = "vae"
    # "mode" is deterministic; "sample" draws from the posterior with a per-image seed (see encode).
    latent: Literal["mode", "sample"] = "mode"
    seed: int = 0
    # False stores raw latents (what the seed's consumers normalised themselves);
    # True stores (z - shift_factor) * scaling_factor, what a Flux transformer consumes.
    scaled: bool = False
    input_mode: Literal["bucket", "original"] = "bucket"
    max_pixels: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent not in ("mode", "sample"):
            raise ValueError(f"latent must be 'mode' or 'sample', got {self.latent!r}")
        if self.input_mode not in ("bucket", "original"):
            raise ValueError(f"input_mode must be 'bucket' or 'original', got {self.input_mode!r}")

    def recipe(self) -> Recipe:
        """Kind "vae_latents". The seed counts only when sampling and the pixel cap only in "original"
        mode, so changing a setting that cannot change the bytes does not re-encode everything."""
        options: dict[str, Any] = {
            "subfolder": self.subfolder,
            "latent": self.latent,
            "scaled": self.scaled,
            "input_mode": self.input_mode,
        }
        if self.latent == "sample":
            options["seed"] = self.seed
        if self.input_mode == "original":
            options["max_pixels"] = self.max_pixels
        return self._recipe("vae_latents", **options)

    def load(self) -> FluxVaeEncoder:
        from diffusers import AutoencoderKL

        device, dtype = self.torch_device(), self.torch_dtype()

        def load() -> FluxVaeEncoder:
            vae = AutoencoderKL.from_pretrained(
                self.model_id, subfolder=self.subfolder, revision=self.revision, torch_dtype=dtype,
                low_cpu_mem_usage=False,  # else diffusers asks for `accelerate`, which is not a dependency
            )  # fmt: skip
            return FluxVaeEncoder(vae.to(device).eval(), self)

        return guarded_load("flux_vae", "Flux VAE", self.model_id, MODEL_ENV_VAR, load)


def image_seed(seed: int, image_id: str) -> int:
    """The sampling seed of one image: stable across runs, batch compositions and machines."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class FluxVaeEncoder:
    def __init__(self, vae: torch.nn.Module, settings: FluxVaeSettings) -> None:
        self.vae = vae
        self.settings = settings
        self.scaling_factor: float = vae.config.scaling_factor
        self.shift_factor: float = vae.config.shift_factor or 0.0

    def encode(self, images: list[Image.Image], *, image_ids: Sequence[str] | None = None) -> np.ndarray:
        """(B, 16, H/8, W/8) float16 latents of same-size images whose sides are multiples of 16.

        With ``latent="sample"``, ``image_ids`` are required: each image's noise comes from its own
        generator seeded by ``image_seed(seed, image_id)``, so a latent does not depend on its batch.
        """
        sizes = {image.size for image in images}
        if len(sizes) != 1:
            raise ValueError(f"encode needs images of one size, got {sorted(sizes)}")
        ((width, height),) = sizes
        if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
            raise ValueError(f"image size {width}x{height} is not a multiple of {SIDE_MULTIPLE}")
        if self.settings.latent == "sample" and (image_ids is None or len(image_ids) != len(images)):
            raise ValueError("latent='sample' needs one image id per image to seed its noise")

        import torch

        parameter = next(self.vae.parameters())
        pixels = pixels_on(parameter.device, images).float() / 127.5 - 1.0  # [-1, 1]
        with torch.inference_mode():
            posterior = self.vae.encode(pixels.to(parameter.dtype)).latent_dist
            latents = posterior.mode() if self.settings.latent == "mode" else self._sample(posterior, image_ids)
            latents = latents.float()
            if self.settings.scaled:
                latents = (latents - self.shift_factor) * self.scaling_factor
            stored = latents.half().cpu().numpy()
        bad_rows = [index for index in range(len(stored)) if not np.isfinite(stored[index]).all()]
        if bad_rows:
            raise ValueError(f"non-finite latents (float16 overflow or NaN) in batch rows {bad_rows}")
        return stored

    def _sample(self, posterior: Any, image_ids: Sequence[str] | None) -> torch.Tensor:
        assert image_ids is not None  # checked by encode
        import torch

        noise = torch.stack(
            [
                torch.randn(
                    posterior.mean.shape[1:],
                    generator=torch.Generator().manual_seed(image_seed(self.settings.seed, image_id)),
                )
                for image_id in image_ids
            ]
        )  # drawn on the CPU so the same seed gives the same noise on every device
        return posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)
