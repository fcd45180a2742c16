"""Automation: a sensor on the remote photo list and a nightly catch-up schedule.

Both start STOPPED unless ``PHOTOSET_AUTOMATION=on`` (so a laptop running the demo never polls the
real API); switch them on in the UI or with that variable on the production instance.
"""

import os

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from .assets.sync import PHOTO_LIST
from .jobs import catch_up_job, image_pipeline_job, prune_job
from .partitions import MAX_IMAGES_PER_RUN
from .photo_list import fetch_listing, register_listing
from .resources import PhotosetConfig, env_int

AUTOMATION_ON = os.environ.get("PHOTOSET_AUTOMATION", "off").strip().lower() in {"1", "on", "true", "yes"}
DEFAULT_STATUS = dg.DefaultSensorStatus.RUNNING if AUTOMATION_ON else dg.DefaultSensorStatus.STOPPED
SENSOR_INTERVAL_S = env_int("PHOTOSET_SENSOR_INTERVAL_S", 600)
NIGHTLY_CRON = os.environ.get("PHOTOSET_NIGHTLY_CRON", "0 2 * * *")
IMAGES_PER_SENSOR_RUN = MAX_IMAGES_PER_RUN if MAX_IMAGES_PER_RUN > 0 else 1000


def pipeline_run_requests(new_ids: list[str], digest: str) -> list[dg.RunRequest]:
    """New ids were added in one bulk call, so they are contiguous in partition order: a run covers a
    range of up to IMAGES_PER_SENSOR_RUN of them and loads each model once."""
    requests = []
    for start in range(0, len(new_ids), IMAGES_PER_SENSOR_RUN):
        chunk = new_ids[start : start + IMAGES_PER_SENSOR_RUN]
        requests.append(
            dg.RunRequest(
                run_key=f"pipeline:{digest}:{start}",
                job_name=image_pipeline_job.name,
                tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1]},
            )
        )
    return requests


@dg.sensor(
    name="photo_list_sensor",
    jobs=[image_pipeline_job, prune_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DEFAULT_STATUS,
    description=(
        "Polls the remote photo list. Unchanged (same hash of the sorted ids) -> skip. New ids -> registered "
        "in bulk and processed by the image pipeline in runs of up to 1,000 images. Ids gone from a complete "
        "list -> the prune job (with its mass-deletion guard). A failed page -> no prune; the tick says why."
    ),
)
def photo_list_sensor(context: dg.SensorEvaluationContext, photoset: PhotosetConfig):
    listing = fetch_listing(photoset, log=context.log.debug)
    if listing.complete and context.cursor == listing.digest:
        return dg.SkipReason(f"photo list unchanged: {len(listing.items)} photos (digest {listing.digest[:12]})")
    registration = register_listing(context.instance, photoset, listing)
    run_requests = pipeline_run_requests(registration.new_ids, listing.digest)
    if registration.removed_ids:
        run_requests.append(
            dg.RunRequest(
                run_key=f"prune:{listing.digest}",
                job_name=prune_job.name,
                run_config={"ops": {"prune": {"config": {"refresh_list": False}}}},
                tags={"photoset/removed_ids": str(len(registration.removed_ids))},
            )
        )
    observation = dg.AssetObservation(
        asset_key=PHOTO_LIST,
        metadata={
            "photos": len(listing.items),
            "digest": listing.digest,
            "complete": listing.complete,
            "new": len(registration.new_ids),
            "removed": len(registration.removed_ids),
        },
    )
    if not listing.complete:
        # Keep the cursor: the next tick retries the full list; additions are safe, prune is not.
        reason = f"photo list incomplete ({listing.error}); no prune this tick"
        context.log.warning(reason)
        if not run_requests:
            return dg.SkipReason(reason)
        return dg.SensorResult(run_requests=run_requests, asset_events=[observation])
    return dg.SensorResult(run_requests=run_requests, cursor=listing.digest, asset_events=[observation])


nightly_sync = dg.ScheduleDefinition(
    name="nightly_sync",
    job=catch_up_job,
    cron_schedule=NIGHTLY_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING if AUTOMATION_ON else dg.DefaultScheduleStatus.STOPPED,
    run_config={
        "ops": {"catch_up": {"config": {"refresh_list": True, "passes": ["sync", "all"], "build_dataset": True}}}
    },
    description=(
        "Every night (02:00 UTC by default, PHOTOSET_NIGHTLY_CRON): full sync (downloads anything missing, "
        "repairs links), then every pass for anything missing or stale, then the dataset JSONL and shards."
    ),
)
