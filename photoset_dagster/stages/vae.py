"""The ``vae_latents`` stage: Flux VAE latents (16, H/8, W/8) float16 of the bucket crop (or of the
whole image at sides rounded to 16, in "original" input mode)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.artefacts import write_npy_artefact
from ..core.layout import DataLayout
from ..core.validity import judge_npy
from .base import VAE, Job, ModelStage, input_group, model_image

if TYPE_CHECKING:
    from ..models.flux_vae import FluxVaeEncoder, FluxVaeSettings


class VaeStage(ModelStage["FluxVaeEncoder"]):
    name = VAE
    kind = "vae_latents"

    def __init__(self, layout: DataLayout, settings: FluxVaeSettings) -> None:
        super().__init__(layout, settings.recipe(), settings.batch_size)
        self.input_mode = settings.input_mode
        self.max_pixels = settings.max_pixels

    def plan(self, image_id: str, facts: Mapping[str, Any]) -> tuple[Job, Mapping[str, Any] | None]:
        job = Job(image_id, facts)
        judgment = judge_npy(self.layout, self.kind, image_id, self.recipe, job.raw_inputs)
        return job, judgment.record if judgment.valid else None

    def bytes_per_image(self) -> int:
        # 16 float16 channels at 1/8 of the largest input: a bucket (1344 x 704) or max_pixels.
        pixels = 1344 * 704 if self.input_mode == "bucket" else self.max_pixels
        return 16 * 2 * pixels // 64 + 4096

    def group(self, job: Job) -> str:
        return input_group(job.facts, self.input_mode, self.max_pixels)

    def prepare(self, job: Job) -> Any:
        return model_image(self.layout, job, self.input_mode, self.max_pixels)

    def compute(self, model: FluxVaeEncoder, jobs: Sequence[Job], prepared: Sequence[Any]) -> Sequence[Any]:
        latents = model.encode(list(prepared), image_ids=[job.image_id for job in jobs])
        return [(latent, image.size) for latent, image in zip(latents, prepared)]

    def write(self, job: Job, output: tuple[np.ndarray, tuple[int, int]]) -> Mapping[str, Any]:
        latent, (width, height) = output
        return write_npy_artefact(self.layout, self.kind, job.image_id, latent, self.recipe, job.raw_inputs,
                                  extra={"input_size": [width, height]})
