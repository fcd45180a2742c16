"""The Postgres instance (deploy/postgres/dagster.yaml) against a real PostgreSQL server started for
this module: the photo-list sensor registers partitions there, a range run of the cheap stages
records its materializations there, and a second instance opened from the same config sees it all.

Skipped only when the PostgreSQL server binaries are missing (`apt-get install postgresql`;
./tasks.sh test installs them when run as root)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME
from photoset_dagster.instance import prepare_dagster_home
from photoset_dagster.instance_storage import PhotosetPostgresEventLogStorage
from photoset_dagster_tests.fixtures_dagster import (
    STORAGE_ASSETS,
    assert_same_answers,
    build_defs,
    materialize_range,
    publish_with_one_broken,
    record_two_runs,
    stock_sqlite_answers,
    storage_answers,
)
from photoset_dagster_tests.postgres_server import PostgresServer, postgres_unavailable, throwaway_postgres



@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    if (reason := postgres_unavailable()) is not None:
        pytest.skip(reason)
    with throwaway_postgres() as server:
        yield server


def _open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


@pytest.fixture
def pg_instance(postgres_server: PostgresServer, tmp_path: Path, monkeypatch) -> Iterator[dg.DagsterInstance]:
    """A DagsterInstance from deploy/postgres/dagster.yaml on a fresh database of the test server."""
    for name, value in postgres_server.instance_env().items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("PHOTOSET_INSTANCE", "postgres")
    prepare_dagster_home()  # what every photoset command does: deploy/postgres/dagster.yaml, gpu pool sized
    instance = _open_instance(home)
    try:
        yield instance
    finally:
        instance.dispose()


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def("photo_list_sensor")
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"photoset": defs.resources["photoset"]}
    )
    return sensor.evaluate_tick(context)


def test_instance_config_selects_postgres_storage(pg_instance):
    from dagster_postgres import PostgresRunStorage, PostgresScheduleStorage

    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PhotosetPostgresEventLogStorage)
    assert isinstance(pg_instance.schedule_storage, PostgresScheduleStorage)
    # The rest of the file is honoured too (the gpu pool, run monitoring).
    assert pg_instance.run_monitoring_enabled
    assert pg_instance.global_op_concurrency_default_limit == 1


def test_sensor_registers_partitions_and_a_range_run_records_materializations(pg_instance, photoset_env, photo_site):
    ids = photo_site.add_images(8)
    photo_site.publish(ids, page_size=3)
    defs = build_defs(photoset_env)

    # (a) The sensor tick, as the daemon runs it: ids registered in bulk, one range run requested.
    first = tick(defs, pg_instance)
    assert pg_instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
    ranges = [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in first.run_requests]
    assert ranges == [(ids[0], ids[-1])]
    assert first.cursor

    # (b) What a backfill of that range does for the cheap stages: one run over first..last.
    result = materialize_range(defs, pg_instance, ["approved_links", "image_facts"], ids[0], ids[-1])
    assert result.success
    unchanged = tick(defs, pg_instance, cursor=first.cursor)
    assert not unchanged.run_requests and "unchanged" in unchanged.skip_message
    assert pg_instance.get_materialized_partitions(dg.AssetKey("image_facts")) == set(ids)
    assert pg_instance.get_materialized_partitions(dg.AssetKey("approved_links")) == set(ids)
    run = pg_instance.get_run_by_id(result.run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS

    # Stored in Postgres, not in the process: a second instance from the same config sees it all.
    other = _open_instance(Path(os.environ["DAGSTER_HOME"]))
    try:
        assert other.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
        assert other.get_materialized_partitions(dg.AssetKey("image_facts")) == set(ids)
        assert other.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        record = other.get_latest_materialization_event(dg.AssetKey("image_facts"))
        assert record is not None and record.run_id == result.run_id
    finally:
        other.dispose()

    # A list change on the next tick only adds the new id (the registration is durable).
    added = ids + photo_site.add_images(1, start=len(ids))
    photo_site.publish(added, page_size=3)
    again = tick(defs, pg_instance, cursor=first.cursor)
    assert [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in again.run_requests] == [
        (added[-1], added[-1])
    ]
    assert pg_instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == added


def test_photoset_postgres_storage_answers_like_dagsters_sqlite(pg_instance, photoset_env, photo_site, tmp_path,
                                                                caplog):
    ids = publish_with_one_broken(photo_site)
    expected = stock_sqlite_answers(photoset_env, tmp_path / "stock-data", ids)

    caplog.set_level(logging.WARNING, logger="photoset_dagster.instance_storage")
    record_two_runs(pg_instance, {**photoset_env, "PHOTOSET_DATA_ROOT": str(tmp_path / "pg-data")}, ids)

    assert_same_answers(storage_answers(pg_instance, STORAGE_ASSETS), expected)
    assert not [r for r in caplog.records if r.name == "photoset_dagster.instance_storage"]  # every batch was written as one
