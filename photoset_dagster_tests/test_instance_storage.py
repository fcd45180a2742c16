"""photoset's SQLite event log writes what Dagster's own would: the same runs, recorded through
Dagster's stock SQLite storage and through photoset's batched one, answer every status question the
same way (materialized partitions, tags stored under the right event ids, the asset's latest
materialization, per-partition check results, each run's own log), every batch written as one (none
fell back to Dagster's event-by-event path). The Postgres twin is in test_postgres.py."""

from __future__ import annotations

import logging

import dagster as dg

from photoset_dagster.instance import prepare_dagster_home
from photoset_dagster.instance_storage import PhotosetSqliteEventLogStorage
from photoset_dagster_tests.fixtures_dagster import (
    STORAGE_ASSETS,
    assert_same_answers,
    publish_with_one_broken,
    record_two_runs,
    stock_sqlite_answers,
    storage_answers,
)


def test_photoset_sqlite_storage_answers_like_dagsters_own(photoset_env, photo_site, tmp_path, monkeypatch, caplog):
    ids = publish_with_one_broken(photo_site)
    expected = stock_sqlite_answers(photoset_env, tmp_path / "stock-data", ids)

    home = tmp_path / "photoset-home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    prepare_dagster_home()
    caplog.set_level(logging.WARNING, logger="photoset_dagster.instance_storage")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.event_log_storage, PhotosetSqliteEventLogStorage)
        record_two_runs(instance, {**photoset_env, "PHOTOSET_DATA_ROOT": str(tmp_path / "photoset-data")}, ids)
        answers = storage_answers(instance, STORAGE_ASSETS)

    assert_same_answers(answers, expected)
    assert not [r for r in caplog.records if r.name == "photoset_dagster.instance_storage"]  # no batch fell back, no run log went short
    good = [i for i in ids if i != ids[2]]
    assert answers["image_facts"]["materialized"] == good
    assert answers["image_facts"]["checks"] == {**{i: ("SUCCEEDED", True) for i in good}, ids[2]: ("FAILED", True)}
    assert len(answers["image_facts"]["materializations"]) == len(good)  # the second run wrote none
