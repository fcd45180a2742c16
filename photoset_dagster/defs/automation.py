"""Automation: a sensor on the remote photo list, a nightly catch-up schedule, and a reaper of dead runs.

The list sensor's tick stays short and bounded: it pages the list with a small retry budget and a
time budget well under the daemon's tick timeout; a list that needs longer (retries, a slow API) is
left to a ``refresh_photo_list_job`` run, which has the full budget. Which ids need work is derived
from the truth each tick — registered ids without an approved link on disk, not failed before, not in
a run that is queued or running — so a failed tick, a hand materialization of ``photo_list`` or a
crashed run never strands an id. The sensor and the schedule start STOPPED unless
``automation.enabled`` (a laptop running the demo never polls the real API); the reaper runs always:
it only looks at this instance.
"""


from collections.abc import Sequence

import dagster as dg
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES, RunsFilter
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ..core.failures import failed_ids
from ..core.http import RetryPolicy
from ..core.links import scan_approved_links
from ..stages.base import APPROVED_LINKS
from .assets.sync import PHOTO_LIST
from .concurrency import reap_dead_runs
from .jobs import catch_up_job, image_pipeline_job, prune_job, refresh_photo_list_job
from .partitions import IMAGE_ID_PARTITIONS_NAME
from .photo_list import fetch_listing, register_listing
from .resources import PhotosetConfig
from .settings import EffectiveSettings

IMAGES_PER_SENSOR_RUN = 1000
# A tick gets ~60 s from the daemon; the listing gets a share of it and at most one quick retry.
TICK_LIST_BUDGET_S = 30.0
TICK_PAGE_TIMEOUT_S = 10.0
TICK_RETRY = RetryPolicy(retries=1, backoff_cap_s=2.0, max_total_wait_s=4.0)


def pending_ids(instance: dg.DagsterInstance, photoset: PhotosetConfig, listed: Sequence[str]) -> list[str]:
    """Listed ids (in partition order) that no sync has linked, failed or is working on now."""
    listed_set = set(listed)
    registered = instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    layout = photoset.layout
    done = set(scan_approved_links(layout)) | failed_ids(layout, APPROVED_LINKS)
    busy = _in_flight(instance, registered)
    return [i for i in registered if i in listed_set and i not in done and i not in busy]


def _in_flight(instance: dg.DagsterInstance, order: list[str]) -> set[str] | frozenset:
    """Ids that runs queued or running right now will sync (a catch-up run covers them all)."""
    runs = instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES),
                                        job_name=image_pipeline_job.name)) + instance.get_runs(
        RunsFilter(statuses=list(NOT_FINISHED_STATUSES), job_name=catch_up_job.name))
    busy: set[str] = set()
    position = {image_id: index for index, image_id in enumerate(order)}
    for run in runs:
        start, end = run.tags.get(ASSET_PARTITION_RANGE_START_TAG), run.tags.get(ASSET_PARTITION_RANGE_END_TAG)
        if start is None or end is None:
            return set(order)  # a catch-up (or an untagged run): everything may be in it
        if start in position and end in position:
            busy.update(order[position[start] : position[end] + 1])
    return busy


def pipeline_run_requests(pending: list[str]) -> list[dg.RunRequest]:
    """Range runs of up to IMAGES_PER_SENSOR_RUN pending ids (new ids were added in one bulk call, so they
    are contiguous in partition order); the run key makes a re-request of the same range a no-op."""
    requests = []
    for start in range(0, len(pending), IMAGES_PER_SENSOR_RUN):
        chunk = pending[start : start + IMAGES_PER_SENSOR_RUN]
        requests.append(dg.RunRequest(
            run_key=f"images:{chunk[0]}:{chunk[-1]}:{len(chunk)}",
            job_name=image_pipeline_job.name,
            tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                  "photoset/trigger": "photo_list_sensor"},
        ))
    return requests


def build_automation(settings: EffectiveSettings) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    enabled = bool(settings.values["automation.enabled"])
    status = dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="photo_list_sensor",
        jobs=[image_pipeline_job, prune_job, refresh_photo_list_job],
        minimum_interval_seconds=int(settings.values["automation.sensor_interval_s"]),
        default_status=status,
        description=(
            "Polls the remote photo list within a short budget. New ids -> registered in bulk and processed in "
            "range runs of up to 1,000 images (ids never synced, never failed, in no running run). Ids gone from "
            "a complete list -> the prune job. A list that could not be read in the tick -> a refresh run with "
            "the full retry budget, and no prune."
        ),
    )
    def photo_list_sensor(context: dg.SensorEvaluationContext, photoset: PhotosetConfig):
        listing = fetch_listing(photoset, log=context.log.debug, policy=TICK_RETRY,
                                page_timeout_s=TICK_PAGE_TIMEOUT_S, time_budget_s=TICK_LIST_BUDGET_S)
        registration = register_listing(context.instance, photoset, listing)
        pending = pending_ids(context.instance, photoset, listing.ids)
        run_requests = pipeline_run_requests(pending)
        if listing.complete and registration.removed_ids:
            run_requests.append(dg.RunRequest(
                run_key=f"prune:{listing.digest}",
                job_name=prune_job.name,
                run_config={"ops": {"prune": {"config": {"refresh_list": False}}}},
                tags={"photoset/removed_ids": str(len(registration.removed_ids))},
            ))
        if not listing.complete:
            context.log.warning(f"photo list incomplete ({listing.error}); no prune this tick")
            run_requests.append(dg.RunRequest(run_key=f"refresh:{listing.fetched_at[:13]}",
                                              job_name=refresh_photo_list_job.name))
        observation = dg.AssetObservation(asset_key=PHOTO_LIST, metadata={
            "photos": len(listing.items), "digest": listing.digest, "complete": listing.complete,
            "new": len(registration.new_ids), "pending": len(pending), "removed": len(registration.removed_ids),
        })
        if not run_requests and listing.complete and context.cursor == listing.digest:
            return dg.SkipReason(f"photo list unchanged: {len(listing.items)} photos, nothing pending")
        return dg.SensorResult(run_requests=run_requests, cursor=listing.digest if listing.complete else context.cursor,
                               asset_events=[observation])

    @dg.sensor(
        name="photoset_run_reaper",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks runs whose process died (kill -9, OOM) failed and frees their gpu slots, so the UI "
        "tells the truth and nothing waits on a dead run. Looks only at this instance.",
    )
    def photoset_run_reaper(context: dg.SensorEvaluationContext):
        reaped = reap_dead_runs(context.instance, context.log.info)
        return dg.SkipReason(f"reaped {len(reaped)} dead run(s)" if reaped else "no dead runs")

    nightly_sync = dg.ScheduleDefinition(
        name="nightly_sync",
        job=catch_up_job,
        cron_schedule=str(settings.values["automation.nightly_cron"]),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING if enabled else dg.DefaultScheduleStatus.STOPPED,
        run_config={
            "ops": {"catch_up": {"config": {"refresh_list": True, "passes": ["sync", "all"], "build_dataset": True}}}
        },
        description=(
            "Every night (02:00 UTC by default, automation.nightly_cron): full sync (downloads anything missing, "
            "repairs links), then every pass for anything missing or stale, then the dataset JSONL and shards; "
            "the run ends failed when images failed (after the dataset of the good ones is built)."
        ),
    )
    return [photo_list_sensor, photoset_run_reaper], [nightly_sync]
