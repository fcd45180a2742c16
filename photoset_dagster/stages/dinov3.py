"""The ``dinov3_embeddings`` stage: the CLS vector of the full image (as Stage 1 computed it) and,
optionally, the patch tokens of the bucket crop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.artefacts import file_proof, write_npy_artefact
from ..core.atomic import atomic_write_bytes, npy_bytes
from ..core.images import decode_image, model_input
from ..core.layout import PATCHES_DIR, DataLayout
from ..core.validity import bytes_sha256, judge_npy, patches_problem
from .base import DINOV3, Job, ModelStage

if TYPE_CHECKING:
    from ..models.dinov3 import Dinov3Encoder, Dinov3Settings


class Dinov3Stage(ModelStage["Dinov3Encoder"]):
    name = DINOV3
    kind = "dinov3"

    def __init__(self, layout: DataLayout, settings: Dinov3Settings) -> None:
        super().__init__(layout, settings.recipe(), settings.batch_size)
        self.patch_tokens = settings.patch_tokens

    def plan(self, image_id: str, facts: Mapping[str, Any]) -> tuple[Job, Mapping[str, Any] | None]:
        job = Job(image_id, facts)
        judgment = judge_npy(self.layout, self.kind, image_id, self.recipe, job.raw_inputs)
        current = judgment.valid and not (self.patch_tokens and patches_problem(self.layout, image_id, judgment.record))
        return job, judgment.record if current else None

    def bytes_per_image(self) -> int:
        # CLS (1024 float32) and, with patch tokens, the largest bucket's 84 x 44 patches of 1024 floats.
        return 8 * 1024 + (84 * 44 * 1024 * 4 if self.patch_tokens else 0)

    def prepare(self, job: Job) -> Any:
        image = decode_image(self.layout.raw_path(job.image_id))
        crop = model_input(image, job.facts["aspect_bucket"], mode="bucket") if self.patch_tokens else None
        return image, crop

    def compute(self, model: Dinov3Encoder, jobs: Sequence[Job], prepared: Sequence[Any]) -> Sequence[Any]:
        cls = model.embed_cls([full for full, _ in prepared])
        patches = model.embed_patches([crop for _, crop in prepared]) if self.patch_tokens else [None] * len(jobs)
        return list(zip(cls, patches))

    def write(self, job: Job, output: tuple[np.ndarray, np.ndarray | None]) -> Mapping[str, Any]:
        cls, patches = output
        extra: dict[str, Any] = {"patches": self.patch_tokens}
        if patches is not None:
            if not np.isfinite(patches).all():
                raise ValueError(f"dinov3 patches for {job.image_id} have non-finite values; not stored")
            # Before the CLS sidecar, which commits both (it carries the patches' proof).
            data = npy_bytes(patches)
            path = self.layout.npy_path(PATCHES_DIR, job.image_id)
            atomic_write_bytes(path, data)
            extra["patches_proof"] = file_proof(path, bytes_sha256(data))
        return write_npy_artefact(self.layout, self.kind, job.image_id, cls, self.recipe, job.raw_inputs, extra=extra)
