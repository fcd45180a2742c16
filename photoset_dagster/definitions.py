"""The photoset Dagster definitions, in pipeline order: sync -> per-image artefacts -> dataset.

`workspace.yaml` points here; `dagster dev`, `dagster asset materialize -m photoset_dagster.definitions`,
`dg` and the `photoset` CLI all load these same definitions, configured from the same settings
(`photoset.toml`, its active profile, `PHOTOSET_*` variables: see `defs.settings`).
"""

from __future__ import annotations

import os

import dagster as dg

from .cli_logging import plain_logger
from .defs.assets.dataset import dataset_jsonl, webdataset_shards
from .defs.assets.images import build_image_assets
from .defs.assets.report import dataset_report, near_duplicates, thumbnails
from .defs.assets.sync import photo_list
from .defs.automation import build_automation
from .defs.execution import ModelResources
from .defs.jobs import catch_up_job, image_pipeline_job, prune_job, refresh_photo_list_job, verify_job
from .defs.resources import resources_from_settings
from .defs.settings import EffectiveSettings, load_settings

# One planned event per run instead of one per partition: a run over 60,000 images otherwise writes
# 60,000 events before it starts (dagster#32242). Every process that loads these definitions — the
# CLI, the code server, run workers, `dagster asset materialize` — gets it, with no environment tweak.
# Failed images are marked Failed by the recorder itself (defs/recorder.py), so nothing is lost.
os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")


def build_definitions(resources: dict | None = None, settings: EffectiveSettings | None = None) -> dg.Definitions:
    settings = load_settings() if settings is None else settings
    resources = resources_from_settings(settings) if resources is None else resources
    models = ModelResources(resources["dinov3"], resources["captioner"], resources["flux_vae"], resources["t5"])
    sensors, schedules = build_automation(settings)
    return dg.Definitions(
        assets=[photo_list, build_image_assets(models.code_versions()), dataset_jsonl, webdataset_shards,
                thumbnails, near_duplicates, dataset_report],
        jobs=[refresh_photo_list_job, image_pipeline_job, catch_up_job, prune_job, verify_job],
        sensors=sensors,
        schedules=schedules,
        resources=resources,
        loggers={"console": dg.colored_console_logger, "plain": plain_logger},
        # Every run in one process, from the UI and `dagster asset materialize` too: models load once
        # per run, and the run's lease (a flock of its process) lives as long as the run, not one step.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
