"""The photo-list sensor and the nightly schedule, evaluated like the daemon would, against a
loopback photo API serving 2,000 ids."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME
from photoset_dagster.defs.photo_list import PHOTO_LIST
from photoset_dagster.demo.server import Fault
from photoset_dagster_tests.fixtures_dagster import build_defs, photo_id

LIST_SIZE = 2000


def tick(defs, instance, cursor=None):
    sensor = defs.resolve_sensor_def("photo_list_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"photoset": defs.resources["photoset"]})
    return sensor.evaluate_tick(context)


def listed(photo_site, ids):
    photo_site.publish(ids, page_size=100)


def test_first_tick_registers_2000_ids_in_bulk_and_requests_runs_of_1000(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(LIST_SIZE)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)

    data = tick(defs, instance)

    assert instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
    ranges = [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in data.run_requests]
    assert ranges == [(ids[0], ids[999]), (ids[1000], ids[1999])]
    assert {r.job_name for r in data.run_requests} == {"image_pipeline_job"}
    assert data.cursor
    # The list is also reported as an observation, so the UI shows when it last changed.
    observation = data.asset_events[0]
    assert observation.asset_key == dg.AssetKey(PHOTO_LIST)
    assert observation.metadata["photos"].value == LIST_SIZE


def test_unchanged_list_skips_then_adds_and_removals_are_handled(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(LIST_SIZE)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    first = tick(defs, instance)

    unchanged = tick(defs, instance, cursor=first.cursor)
    assert not unchanged.run_requests
    assert "unchanged" in unchanged.skip_message

    added = ids + [photo_id(LIST_SIZE + i) for i in range(3)]
    listed(photo_site, added)
    with_adds = tick(defs, instance, cursor=first.cursor)
    assert [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in with_adds.run_requests] == [
        (added[-3], added[-1])
    ]

    removed = [i for i in added if i not in {ids[5], ids[700]}]
    listed(photo_site, removed)
    with_removals = tick(defs, instance, cursor=with_adds.cursor)
    assert [r.job_name for r in with_removals.run_requests] == ["prune_job"]
    assert with_removals.run_requests[0].run_config == {"ops": {"prune": {"config": {"refresh_list": False}}}}
    assert with_removals.cursor != with_adds.cursor


def test_a_failed_page_never_prunes_and_the_tick_says_why(photoset_env, photo_site, instance):
    ids = [photo_id(i) for i in range(300)]
    listed(photo_site, ids)
    defs = build_defs(photoset_env)
    first = tick(defs, instance)

    listed(photo_site, ids[:200])  # 100 ids gone ...
    photo_site.server.add_fault("/photos.json?page=2", Fault("status", status=500, times=-1))  # ... but a page fails
    data = tick(defs, instance, cursor=first.cursor)

    assert not data.run_requests
    assert "incomplete" in data.skip_message and "no prune" in data.skip_message
    assert len(instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)) == 300


def test_nightly_schedule_runs_a_full_catch_up(photoset_env, instance):
    defs = build_defs(photoset_env)
    schedule = defs.resolve_schedule_def("nightly_sync")
    data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    [request] = data.run_requests
    config = request.run_config["ops"]["catch_up"]["config"]
    assert config["refresh_list"] and config["build_dataset"] and "all" in config["passes"]
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == "catch_up_job"
