"""Fixtures for the Dagster layer: a temporary persistent instance, a loopback photo server with a
few small images, and the real definitions built from environment-style settings pointing at the
tiny models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from photoset_dagster.core.layout import DataLayout
from photoset_dagster.demo.server import PhotoServer
from photoset_dagster_tests.fixtures_http import image_bytes

# Sizes (W, H) that land in different aspect buckets; multiples of 16 keep VAE "original" exact.
SIZES = ((48, 48), (32, 48), (48, 32), (32, 64), (64, 32))


def photo_id(index: int) -> str:
    return f"img{index:04d}"


@dataclass
class PhotoSite:
    """A loopback photo API whose list and files the test can change between runs."""

    server: PhotoServer
    ids: list[str]

    def publish(self, ids: Sequence[str], page_size: int = 10) -> None:
        items = [{"filename": image_id, "exportable_url": self.server.file_url(image_id)} for image_id in ids]
        self.server.set_pages([items[i : i + page_size] for i in range(0, len(items), page_size)])
        self.ids = list(ids)

    def add_images(self, count: int, start: int = 0, fmt: str = "PNG") -> list[str]:
        ids = []
        for index in range(start, start + count):
            image_id = photo_id(index)
            self.server.set_file(image_id, image_bytes(fmt, SIZES[index % len(SIZES)], seed=index))
            ids.append(image_id)
        return ids


@pytest.fixture
def photo_site() -> Iterator[PhotoSite]:
    with PhotoServer() as server:
        yield PhotoSite(server, [])


@pytest.fixture
def photoset_env(tmp_path: Path, photo_site: PhotoSite, tiny_models) -> dict[str, str]:
    return {
        "PHOTOSET_SETTINGS": str(tmp_path / "photoset.toml"),  # never the project's own settings file
        "PHOTOSET_MIN_FREE_GB": "0",
        "PHOTOSET_DATA_ROOT": str(tmp_path / "data"),
        "PHOTOSET_PHOTOS_URL": photo_site.server.photos_url,
        "PHOTOSET_ALLOW_HTTP": "1",
        "PHOTOSET_TIMEOUT_S": "5",
        "PHOTOSET_RETRIES": "1",
        "PHOTOSET_DEVICE": "cpu",
        "PHOTOSET_DINOV3_MODEL": str(tiny_models.dinov3),
        "PHOTOSET_CAPTION_MODEL": str(tiny_models.gemma),
        "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "6",
        "PHOTOSET_VAE_MODEL": str(tiny_models.flux),
        "PHOTOSET_VAE_INPUT_MODE": "original",
        "PHOTOSET_T5_MODEL": str(tiny_models.t5),
    }


@pytest.fixture
def data_layout(photoset_env) -> DataLayout:
    return DataLayout(photoset_env["PHOTOSET_DATA_ROOT"])


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def build_defs(env: dict[str, str]) -> dg.Definitions:
    from photoset_dagster.definitions import build_definitions
    from photoset_dagster.defs.resources import resources_from_env

    return build_definitions(resources_from_env(env))


def materialize_range(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    assets: Sequence[str],
    first: str,
    last: str,
    run_config: dict | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """What a backfill of one range does: one run over first..last (partition order)."""
    keys = [dg.AssetKey(name) for name in assets]
    job = defs.resolve_implicit_job_def_def_for_assets(keys)
    return job.execute_in_process(
        instance=instance,
        asset_selection=keys,
        tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
        run_config=run_config or {},
        raise_on_error=raise_on_error,
    )


def run_job(defs: dg.Definitions, instance: dg.DagsterInstance, job: str, op: str, config: dict, **kwargs):
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config={"ops": {op: {"config": config}}}, **kwargs
    )


def materialized_keys(result: dg.ExecuteInProcessResult, asset: str) -> list[str]:
    return [
        event.partition
        for event in result.all_events
        if event.event_type_value == "ASSET_MATERIALIZATION" and event.asset_key == dg.AssetKey(asset)
    ]


def storage_answers(instance: dg.DagsterInstance, assets: Sequence[str]) -> dict:
    """What the web UI and Dagster's status APIs can learn about ``assets`` from an instance, with
    storage ids and run ids replaced by what they point at, so two storages can be compared."""
    from dagster._core.definitions.asset_checks.asset_check_spec import AssetCheckKey

    runs = {run.run_id: index for index, run in enumerate(reversed(instance.get_runs()))}
    storage = instance.event_log_storage
    answers: dict = {}
    for name in assets:
        key = dg.AssetKey(name)
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=10_000).records
        by_id = {record.storage_id: record for record in records}
        materializations = []
        for record in records:
            tags = {k: v for k, v in record.asset_materialization.tags.items() if "input_event_pointer" not in k}
            # the tag rows stored under this event's id: a wrong id finds another image's, or none
            rows = storage.get_event_tags_for_asset(key, filter_event_id=record.storage_id)
            stored_right = len(rows) == 1 and all(tags.get(k) == v for k, v in rows[0].items())
            materializations.append((record.partition_key, runs[record.run_id], tuple(sorted(tags)),
                                     tuple(sorted(record.asset_materialization.metadata)), stored_right))
        materializations.sort()
        entry = instance.get_asset_records([key])[0].asset_entry
        last = entry.last_materialization_record
        checks = {info.partition_key: (info.latest_execution_status.value, info.is_current)
                  for info in storage.get_asset_check_partition_info([AssetCheckKey(key, "artefact_valid")])}
        answers[name] = {
            "materialized": sorted(instance.get_materialized_partitions(key)),
            "materializations": materializations,
            # the asset's row names its newest materialization (which partition finished last varies)
            "asset row": (runs.get(entry.last_run_id), last is not None and last.storage_id == max(by_id)),
            "checks": checks,
        }
    # each run's own log: every event there once (a batch stored twice, or lost, shows here)
    answers["run logs"] = {
        index: sorted(Counter(entry.dagster_event_type.value for entry in instance.all_logs(run_id)
                              if entry.is_dagster_event).items())
        for run_id, index in runs.items()
    }
    return answers


STORAGE_ASSETS = ["approved_links", "image_facts", "dinov3_embeddings"]


def publish_with_one_broken(photo_site: PhotoSite) -> list[str]:
    """Six photos, the third of which cannot decode."""
    ids = photo_site.add_images(6)
    broken = image_bytes("PNG", (48, 48), seed=3)
    photo_site.server.set_file(ids[2], broken[: len(broken) // 2])
    photo_site.publish(ids)
    return ids


def record_two_runs(instance: dg.DagsterInstance, env: dict[str, str], ids: list[str]) -> None:
    """A range run with one image that cannot decode, then the same run again (all recorded by then)."""
    defs = build_defs(env)
    assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success
    for _ in range(2):
        result = materialize_range(defs, instance, STORAGE_ASSETS, ids[0], ids[-1], raise_on_error=False)
        assert not result.success  # the broken image fails its run


def stock_sqlite_answers(env: dict[str, str], data_root: Path, ids: list[str]) -> dict:
    """The reference: :func:`record_two_runs` recorded by Dagster's own SQLite storage."""
    with dg.instance_for_test() as stock:
        record_two_runs(stock, {**env, "PHOTOSET_DATA_ROOT": str(data_root)}, ids)
        return storage_answers(stock, STORAGE_ASSETS)


def assert_same_answers(answers: dict, expected: dict) -> None:
    for name in STORAGE_ASSETS:
        for question, answer in expected[name].items():
            assert answers[name][question] == answer, (name, question)
    assert answers["run logs"] == expected["run logs"]
    # and the questions were not vacuous: tag rows were found under each event's id
    assert all(stored_right for name in STORAGE_ASSETS for *_, stored_right in answers[name]["materializations"])
