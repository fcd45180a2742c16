"""The ``captions`` stage: one dense Gemma 3 paragraph per image, from whichever backend is set.

Captions record their model, prompt hash and decoding settings (the recipe), not the backend, so
moving the same model between in-process and a vLLM server does not redo 60,000 expensive captions.
An HTTP backend streams: dozens of requests stay in flight instead of one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..core.artefacts import write_json_artefact
from ..core.layout import DataLayout
from ..core.validity import judge_caption
from .base import CAPTIONS, Job, ModelStage, input_group, model_image

if TYPE_CHECKING:
    from ..models.captioner import Captioner, CaptionSettings

# Pixel cap for "original"-mode inputs (core.images.model_input's default).
ORIGINAL_MAX_PIXELS = 4 * 1024 * 1024


class CaptionsStage(ModelStage["Captioner"]):
    name = CAPTIONS
    kind = "captions"

    def __init__(self, layout: DataLayout, settings: CaptionSettings, input_mode: str = "bucket") -> None:
        super().__init__(layout, settings.recipe(), settings.batch_size)
        self.settings = settings
        self.input_mode = input_mode

    def plan(self, image_id: str, facts: Mapping[str, Any]) -> tuple[Job, Mapping[str, Any] | None]:
        job = Job(image_id, facts)
        judgment = judge_caption(self.layout, image_id, self.recipe, job.raw_inputs)
        return job, judgment.record if judgment.valid else None

    def bytes_per_image(self) -> int:
        return 8 * 1024

    def group(self, job: Job) -> str:
        return input_group(job.facts, self.input_mode, ORIGINAL_MAX_PIXELS)

    def prepare(self, job: Job) -> Any:
        return model_image(self.layout, job, self.input_mode, ORIGINAL_MAX_PIXELS)

    def compute(self, model: Captioner, jobs: Sequence[Job], prepared: Sequence[Any]) -> Sequence[Any]:
        return model.caption(list(prepared))

    def streams(self, model: Captioner) -> bool:
        from ..models.captioner import StreamingCaptioner

        return isinstance(model, StreamingCaptioner)

    def stream(self, model: Captioner, items: Iterator[tuple[Job, Any]]) -> Iterator[tuple[Job, Any]]:
        jobs: dict[str, Job] = {}

        def keyed() -> Iterator[tuple[str, Any]]:
            for job, image in items:
                jobs[job.image_id] = job
                yield job.image_id, image

        for image_id, caption in model.caption_stream(keyed()):
            yield jobs.pop(image_id), caption

    def write(self, job: Job, caption: str) -> Mapping[str, Any]:
        body = {"caption": caption, "backend": self.settings.backend, "input_mode": self.input_mode}
        return write_json_artefact(self.layout, "captions", job.image_id, body=body, recipe=self.recipe,
                                   inputs=job.raw_inputs)
