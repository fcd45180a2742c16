"""The photo-list sensor, the run reaper and the nightly schedule, evaluated like the daemon would,
against a loopback photo API serving 2,000 ids. Between ticks, ``launch`` does what the daemon does with
a tick's run requests: it queues them as runs."""

import os
import socket
import time

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import create_run_for_test

from photoset_dagster.core.leases import FileLease
from photoset_dagster.defs import automation
from photoset_dagster.defs.concurrency import LEASE_HOST_TAG, LEASE_PID_TAG, lease_dir
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME
from photoset_dagster.defs.photo_list import PHOTO_LIST
from photoset_dagster.demo.server import Fault
from photoset_dagster_tests.fixtures_dagster import build_defs, photo_id

LIST_SIZE = 2000


def tick(defs, instance, cursor=None, name="photo_list_sensor"):
    sensor = defs.resolve_sensor_def(name)
    resources = {"photoset": defs.resources["photoset"]} if name == "photo_list_sensor" else {}
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return sensor.evaluate_tick(context)


def launch(instance, data):
    """Create the tick's run requests as runs not started yet, as the daemon does before launching them."""
    for request in data.run_requests:
        create_run_for_test(instance, job_name=request.job_name, status=DagsterRunStatus.NOT_STARTED,
                            tags={**request.tags, "dagster/run_key": request.run_key or ""})


def ranges(data):
    return [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG])
            for r in data.run_requests if r.job_name == "image_pipeline_job"]


def listed(photo_site, ids):
    photo_site.publish(ids, page_size=100)


def test_first_tick_registers_2000_ids_in_bulk_and_requests_runs_of_1000(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(LIST_SIZE)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)

    data = tick(defs, instance)

    assert instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
    assert ranges(data) == [(ids[0], ids[999]), (ids[1000], ids[1999])]
    assert {r.job_name for r in data.run_requests} == {"image_pipeline_job"}
    assert data.cursor
    # The list is also reported as an observation, so the UI shows when it last changed.
    observation = data.asset_events[0]
    assert observation.asset_key == dg.AssetKey(PHOTO_LIST)
    assert observation.metadata["photos"].value == LIST_SIZE


def test_queued_work_is_not_requested_twice_then_adds_and_removals_are_handled(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(LIST_SIZE)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    first = tick(defs, instance)
    launch(instance, first)

    unchanged = tick(defs, instance, cursor=first.cursor)
    assert not unchanged.run_requests and "unchanged" in unchanged.skip_message

    added = ids + [photo_id(LIST_SIZE + i) for i in range(3)]
    listed(photo_site, added)
    with_adds = tick(defs, instance, cursor=first.cursor)
    assert ranges(with_adds) == [(added[-3], added[-1])]
    launch(instance, with_adds)

    removed = [i for i in added if i not in {ids[5], ids[700]}]
    listed(photo_site, removed)
    with_removals = tick(defs, instance, cursor=with_adds.cursor)
    assert [r.job_name for r in with_removals.run_requests] == ["prune_job"]
    assert with_removals.run_requests[0].run_config == {"ops": {"prune": {"config": {"refresh_list": False}}}}
    assert with_removals.cursor != with_adds.cursor


def test_ids_a_hand_materialization_registered_are_not_stranded(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(50)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    # Someone materializes photo_list by hand: the ids are registered, nothing processes them.
    assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success
    assert instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids

    data = tick(defs, instance)

    assert ranges(data) == [(ids[0], ids[-1])]  # registered, never synced, in no run: requested


def test_a_finished_run_that_synced_its_ids_leaves_nothing_pending(photoset_env, photo_site, instance):
    ids = photo_site.add_images(6)
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    first = tick(defs, instance)
    [request] = first.run_requests
    defs.resolve_job_def("image_pipeline_job").execute_in_process(
        instance=instance, tags=request.tags, asset_selection=[dg.AssetKey("approved_links")])

    again = tick(defs, instance, cursor=first.cursor)

    assert not again.run_requests and "nothing pending" in again.skip_message


def test_a_failed_page_never_prunes_and_hands_the_list_to_a_run(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(300)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    first = tick(defs, instance)
    launch(instance, first)

    listed(photo_site, ids[:200])  # 100 ids gone ...
    photo_site.server.add_fault("/photos.json?page=2", Fault("status", status=500, times=-1))  # ... but a page fails
    data = tick(defs, instance, cursor=first.cursor)

    assert [r.job_name for r in data.run_requests] == ["refresh_photo_list_job"]  # full retry budget, in a run
    assert data.cursor == first.cursor
    assert len(instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)) == 300


def test_a_tick_stays_bounded_when_the_list_server_stalls(photoset_env, photo_site, instance, monkeypatch):
    ids = [photo_id(i) for i in range(300)]
    listed(photo_site, ids)
    monkeypatch.setattr(automation, "TICK_PAGE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(automation, "TICK_LIST_BUDGET_S", 1.0)
    for page in (1, 2, 3):
        photo_site.server.add_fault(f"/photos.json?page={page}", Fault("timeout", delay_s=30, times=-1))
    defs = build_defs(photoset_env)

    started = time.monotonic()
    data = tick(defs, instance)
    elapsed = time.monotonic() - started

    assert elapsed < 8, elapsed  # page timeout x attempts + a little: never the server's 30 s stall
    assert [r.job_name for r in data.run_requests] == ["refresh_photo_list_job"]


def test_the_reaper_marks_a_dead_run_failed_and_frees_its_slot(photoset_env, instance):
    defs = build_defs(photoset_env)
    run = create_run_for_test(instance, job_name="image_pipeline_job", status=DagsterRunStatus.STARTED,
                              tags={LEASE_HOST_TAG: socket.gethostname(), LEASE_PID_TAG: "999999"})
    # The lease file a killed process leaves: present, and nobody holds its lock.
    FileLease.try_take(lease_dir(instance) / f"{run.run_id}.lock", {"run_id": run.run_id}).release(remove=False)
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "image_pipeline")

    data = tick(defs, instance, name="photoset_run_reaper")

    assert "reaped 1" in data.skip_message
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []


def test_the_reaper_sweeps_the_lease_files_of_ended_runs_and_keeps_live_ones(photoset_env, instance):
    defs = build_defs(photoset_env)
    ended = create_run_for_test(instance, job_name="image_pipeline_job", status=DagsterRunStatus.SUCCESS)
    live = create_run_for_test(instance, job_name="image_pipeline_job", status=DagsterRunStatus.STARTED,
                               tags={LEASE_HOST_TAG: socket.gethostname(), LEASE_PID_TAG: str(os.getpid())})
    FileLease.try_take(lease_dir(instance) / f"{ended.run_id}.lock", {}).release(remove=False)  # its process exited
    held = FileLease.try_take(lease_dir(instance) / f"{live.run_id}.lock", {"run_id": live.run_id})

    tick(defs, instance, name="photoset_run_reaper")

    assert sorted(path.stem for path in lease_dir(instance).glob("*.lock")) == [live.run_id]
    assert instance.get_run_by_id(live.run_id).status == DagsterRunStatus.STARTED
    held.release()


def test_nightly_schedule_runs_a_full_catch_up(photoset_env, instance):
    defs = build_defs(photoset_env)
    schedule = defs.resolve_schedule_def("nightly_sync")
    data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    [request] = data.run_requests
    config = request.run_config["ops"]["catch_up"]["config"]
    assert config["refresh_list"] and config["build_dataset"] and "all" in config["passes"]
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == "catch_up_job"
