"""Fixtures for the Dagster layer: a temporary persistent instance, a loopback photo server with a
few small images, and the real definitions built from environment-style settings pointing at the
tiny models."""

from __future__ import annotations

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
