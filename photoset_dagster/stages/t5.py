"""The ``t5_hidden`` stage: T5 encoder hidden states of each image's caption and the tokenizer's
attention mask (in the sidecar). A new caption (another text hash) makes the old states stale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.artefacts import read_json, text_hash, write_npy_artefact
from ..core.layout import DataLayout
from ..core.validity import judge_npy
from .base import T5, ImageFailure, Job, ModelStage

if TYPE_CHECKING:
    from ..models.t5 import T5Settings, T5TextEncoder


class T5Stage(ModelStage["T5TextEncoder"]):
    name = T5
    kind = "t5_hidden"

    def __init__(self, layout: DataLayout, settings: T5Settings) -> None:
        super().__init__(layout, settings.recipe(), settings.batch_size)

    def plan(self, image_id: str, facts: Mapping[str, Any]) -> tuple[Job, Mapping[str, Any] | None]:
        record = read_json(self.layout.json_path("captions", image_id)) or {}
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ImageFailure("no caption yet (run the captions stage first)")
        job = Job(image_id, facts, text=caption)
        if (record.get("inputs") or {}).get("raw_sha256") != job.raw_inputs["raw_sha256"]:
            raise ImageFailure("the caption describes an older raw file (run the captions stage first)")
        judgment = judge_npy(self.layout, self.kind, image_id, self.recipe, caption_inputs(caption))
        return job, judgment.record if judgment.valid else None

    def bytes_per_image(self) -> int:
        return int(self.recipe.settings["max_length"]) * 1024 * 2 + 4096  # T5-Large's 1024 float16 per token

    def group(self, job: Job) -> str:
        return "text"  # every caption pads to max_length, so any captions stack

    def prepare(self, job: Job) -> Any:
        return job.text

    def compute(self, model: T5TextEncoder, jobs: Sequence[Job], prepared: Sequence[Any]) -> Sequence[Any]:
        hidden, masks = model.encode(list(prepared))
        return list(zip(hidden, masks))

    def write(self, job: Job, output: tuple[np.ndarray, np.ndarray]) -> Mapping[str, Any]:
        hidden, mask = output
        extra = {"attention_mask": mask.tolist(), "token_count": int(mask.sum())}
        return write_npy_artefact(self.layout, self.kind, job.image_id, hidden, self.recipe,
                                  caption_inputs(job.text), extra=extra)


def caption_inputs(caption: str) -> dict[str, str]:
    return {"caption_sha256": text_hash(caption)}
