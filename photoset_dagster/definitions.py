"""The photoset Dagster definitions, in pipeline order: sync -> per-image artefacts -> dataset.

`workspace.yaml` points here; `dagster dev`, `dagster asset materialize -m photoset_dagster.definitions`
and the `photoset` CLI all load these same definitions.
"""

from __future__ import annotations

import dagster as dg

from .cli_logging import plain_logger
from .defs.assets.dataset import dataset_jsonl, recipe_hashes, webdataset_shards
from .defs.assets.images import build_image_assets
from .defs.assets.sync import photo_list
from .defs.automation import nightly_sync, photo_list_sensor
from .defs.checks import artefact_checks
from .defs.jobs import catch_up_job, image_pipeline_job, prune_job, refresh_photo_list_job, verify_job
from .defs.pipeline import CAPTIONS, DINOV3, T5, VAE
from .defs.resources import resources_from_env


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    resources = resources_from_env() if resources is None else resources
    hashes = recipe_hashes(resources["dinov3"], resources["captioner"], resources["flux_vae"], resources["t5"])
    code_versions = {
        CAPTIONS: hashes["captions"],
        DINOV3: hashes["dinov3"],
        VAE: hashes["vae_latents"],
        T5: hashes["t5_hidden"],
    }
    return dg.Definitions(
        assets=[photo_list, build_image_assets(code_versions), dataset_jsonl, webdataset_shards],
        asset_checks=artefact_checks,
        jobs=[refresh_photo_list_job, image_pipeline_job, catch_up_job, prune_job, verify_job],
        sensors=[photo_list_sensor],
        schedules=[nightly_sync],
        resources=resources,
        loggers={"console": dg.colored_console_logger, "plain": plain_logger},
    )


defs = build_definitions()
