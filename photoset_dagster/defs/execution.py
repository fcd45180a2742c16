"""Runs the per-image stages inside a Dagster step and records them: the glue every path shares
(the ``image_pipeline`` assets, the catch-up job, the CLI through either).

The stages work in a worker thread; this step's thread writes the outcomes to Dagster through the
recorder as they come. A model loads only when its stage has work, after this step has taken a
``gpu`` slot and a device; stages that run no model here never take them.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent

from ..core.artefacts import Recipe
from ..core.layout import DataLayout
from ..stages.base import CAPTIONS, DINOV3, MODEL_STAGES, STAGE_KINDS, T5, VAE, Note
from ..stages.captions import CaptionsStage
from ..stages.dinov3 import Dinov3Stage
from ..stages.pipeline import ModelWork, SyncWork, run_pipeline
from ..stages.t5 import T5Stage
from ..stages.vae import VaeStage
from .concurrency import ModelSlot, hold_run_lease
from .recorder import Recorder, RunSummary, stream_in_worker
from .resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model


@dataclass
class ModelResources:
    dinov3: Dinov3Model
    captioner: CaptionModel
    flux_vae: FluxVaeModel
    t5: T5Model

    def for_stage(self, stage: str) -> Any:
        return {CAPTIONS: self.captioner, DINOV3: self.dinov3, VAE: self.flux_vae, T5: self.t5}[stage]

    def recipes(self) -> dict[str, Recipe]:
        """The recipe in force per artefact kind (what verify, the dataset and the shards accept)."""
        return {STAGE_KINDS[stage]: self.for_stage(stage).settings().recipe() for stage in MODEL_STAGES}

    def stage(self, stage: str, layout: DataLayout) -> Any:
        """The stage object that computes ``stage`` with this run's settings."""
        if stage == CAPTIONS:
            return CaptionsStage(layout, self.captioner.settings(), self.captioner.input_mode)
        if stage == DINOV3:
            return Dinov3Stage(layout, self.dinov3.settings())
        if stage == VAE:
            return VaeStage(layout, self.flux_vae.settings())
        return T5Stage(layout, self.t5.settings())

    def code_versions(self) -> dict[str, str]:
        """Each model stage's recipe hash: Dagster's code version of its asset."""
        return {stage: self.for_stage(stage).settings().recipe().hash for stage in MODEL_STAGES}


class _Provider:
    """Loads a stage's model on first call, on the device this run leased for its models."""

    def __init__(self, resource: Any, slot: ModelSlot) -> None:
        self.resource = resource
        self.slot = slot

    def __call__(self) -> Any:
        device = self.slot.acquire(self.resource.device, self.resource.devices) if self.resource.runs_locally else None
        return self.resource.get(device)

    def stats(self) -> Mapping[str, Any]:
        model = self.resource.loaded
        return model.stats() if callable(getattr(model, "stats", None)) else {}


def run_and_record(
    context: dg.OpExecutionContext,
    *,
    stages: Sequence[str],
    image_ids: Sequence[str],
    photoset: PhotosetConfig,
    models: ModelResources,
    sync: SyncWork | None = None,
    force: bool = False,
    dry_run: bool = False,
    tolerate_failures: bool = False,
    check_stages: Sequence[str] = (),
) -> Generator[DagsterEvent, None, RunSummary]:
    """Run ``stages`` over ``image_ids`` and record every outcome; ``summary = yield from ...``.
    Fails the step at the end when images failed, unless ``tolerate_failures``."""
    hold_run_lease(context.instance, context.run_id)
    slot = ModelSlot(context.instance, context.run_id, str(context.op_handle))
    works = {
        stage: ModelWork(models.stage(stage, photoset.layout), _Provider(models.for_stage(stage), slot))
        for stage in stages
        if stage in MODEL_STAGES
    }
    code_versions = {**models.code_versions()}
    recorder = Recorder(context, code_versions, image_count=len(image_ids), dry_run=dry_run, checked_stages=check_stages)

    def produce(cancel, emit):
        slot.cancel = cancel
        slot.log = lambda message: emit(Note(message))
        return run_pipeline(photoset.layout, stages, image_ids, sync=sync, models=works, force=force,
                            dry_run=dry_run, run_id=context.run_id, cancel=cancel, min_free_gb=photoset.min_free_gb)

    try:
        for item in stream_in_worker(produce, "stages"):
            yield from recorder.record(item)
    except GeneratorExit:
        raise
    except BaseException:
        yield from recorder.flush()  # what finished before the error stays recorded
        raise
    finally:
        for work in works.values():  # the models first: the device and the slot then go to the next run
            work.provider.resource.unload()
        slot.release()
    yield from recorder.finish(tolerate_failures=tolerate_failures)
    return recorder.summary
