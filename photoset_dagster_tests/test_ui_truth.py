"""What the web UI shows, asked through Dagster's own GraphQL schema over the instance — the resolvers
the web UI's pages call: partition statuses (Materialized / Failed / Missing), stale status and causes
(code version changed, "Unsynced"), and the per-partition check results carrying a failure's reason."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster_graphql.test.utils import execute_dagster_graphql

from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME
from photoset_dagster.models.common import LOAD_COUNTS
from photoset_dagster.stages.base import STAGES
from photoset_dagster_tests.fixtures_dagster import build_defs, materialize_range, run_job
from photoset_dagster_tests.fixtures_http import image_bytes

PARTITIONED_QUERY = """
query Truth($assetKey: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions unmaterializedPartitions }
      }
      staleStatusByPartition(partitions: $partitions)
      staleCausesByPartition(partitions: $partitions) { reason category }
    }
  }
}
"""
UNPARTITIONED_QUERY = """
query Truth($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) { ... on AssetNode { staleStatus staleCauses { reason } } }
}
"""
CHECK_QUERY = """
query Checks($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      assetChecksOrError {
        ... on AssetChecks {
          checks {
            name
            partitionStatuses { ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions } }
          }
        }
      }
    }
  }
}
"""


class UI:
    """GraphQL over a workspace that loads the definitions afresh from the test's settings each time
    (as a web UI reloading its code location would)."""

    def __init__(self, instance: dg.DagsterInstance, folder: Path) -> None:
        self.instance = instance
        self.folder = folder
        self.loads = 0

    def _defs_file(self) -> Path:
        self.loads += 1  # a new module name: Python would otherwise reuse the module it loaded before
        path = self.folder / f"ui_defs_{self.loads}.py"
        path.write_text("from photoset_dagster.definitions import build_definitions\ndefs = build_definitions()\n")
        return path

    def asset(self, name: str, partitions: list[str] | None = None) -> dict:
        """The asset's page data; ``partitions`` (possibly empty) for a partitioned asset."""
        origin = LoadableTargetOrigin(python_file=str(self._defs_file()), attribute="defs")
        query, variables = (UNPARTITIONED_QUERY, {}) if partitions is None else (PARTITIONED_QUERY, {"partitions": partitions})
        with in_process_test_workspace(self.instance, origin) as context:
            result = execute_dagster_graphql(context, query, {"assetKey": {"path": [name]}, **variables})
        assert not result.errors, result.errors
        return result.data["assetNodeOrError"]

    def _query(self, query: str, variables: dict) -> dict:
        origin = LoadableTargetOrigin(python_file=str(self._defs_file()), attribute="defs")
        # The webserver sets the partition loading context per request; the test workspace does not.
        with in_process_test_workspace(self.instance, origin) as context, \
                partition_loading_context(dynamic_partitions_store=self.instance):
            result = execute_dagster_graphql(context, query, variables)
        assert not result.errors, result.errors
        return result.data

    def check_statuses(self, name: str) -> dict[str, set[str]]:
        """The artefact_valid check's partition view: which partitions passed, which failed."""
        data = self._query(CHECK_QUERY, {"assetKey": {"path": [name]}})
        (check,) = data["assetNodeOrError"]["assetChecksOrError"]["checks"]
        statuses = check["partitionStatuses"]
        return {"passed": set(statuses["succeededPartitions"]), "failed": set(statuses["failedPartitions"])}

    def statuses(self, name: str) -> dict[str, set[str]]:
        partitions = self.asset(name, [])["assetPartitionStatuses"]
        return {"materialized": set(partitions["materializedPartitions"]),
                "failed": set(partitions["failedPartitions"]),
                "missing": set(partitions["unmaterializedPartitions"])}


@pytest.fixture
def ui(instance, photoset_env, tmp_path, monkeypatch) -> UI:
    for name, value in photoset_env.items():
        monkeypatch.setenv(name, value)
    return UI(instance, tmp_path)


def register(defs, instance) -> list[str]:
    assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success
    return instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)


def test_failed_images_show_failed_with_their_reason_and_the_good_ones_materialized(
    ui, photoset_env, photo_site, instance
):
    ids = photo_site.add_images(5)
    broken = image_bytes("PNG", (48, 48), seed=7)
    photo_site.server.set_file(ids[1], broken[: len(broken) // 2])  # decodes nowhere
    photo_site.server.set_file(ids[3], b"<html>not an image</html>")  # never downloads
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)

    result = run_job(defs, instance, "catch_up_job", "catch_up", {"passes": ["sync", "all"], "build_dataset": True},
                     raise_on_error=False)

    assert not result.success  # 2 of 5 images failed: the run says so
    good = {ids[0], ids[2], ids[4]}
    links = ui.statuses("approved_links")
    assert links["materialized"] == good | {ids[1]} and links["failed"] == {ids[3]}
    for stage in STAGES[1:]:
        statuses = ui.statuses(stage)
        assert statuses["materialized"] == good, stage
        assert statuses["failed"] == {ids[1], ids[3]}, stage  # Failed, not Missing
    # The reason is on the partition itself: its check evaluation.
    evaluations = {(e.asset_key.to_user_string(), e.partition): e for e in result.get_asset_check_evaluations()}
    assert "cannot decode" in evaluations[("image_facts", ids[1])].description
    assert "not a supported image" in evaluations[("image_facts", ids[3])].description
    for stage in STAGES[1:]:  # and the check's own partition view agrees
        assert ui.check_statuses(stage) == {"passed": good, "failed": {ids[1], ids[3]}}, stage
    # Healthy data carries no "Unsynced" badge: the dataset was built from everything that could be built.
    dataset = ui.asset("dataset_jsonl")
    assert dataset["staleStatus"] == "FRESH", dataset["staleCauses"]


def test_a_recipe_change_flags_exactly_the_partitions_of_that_asset(ui, photoset_env, photo_site, instance, monkeypatch):
    ids = photo_site.add_images(4)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    for stage in STAGES:
        assert set(ui.asset(stage, ids)["staleStatusByPartition"]) == {"FRESH"}, stage

    monkeypatch.setenv("PHOTOSET_T5_MAX_LENGTH", "32")  # every process reads the same settings

    t5 = ui.asset("t5_hidden", ids)
    assert t5["staleStatusByPartition"] == ["STALE"] * len(ids)
    assert {cause["reason"] for causes in t5["staleCausesByPartition"] for cause in causes} == {"has a new code version"}
    for stage in STAGES[:-1]:
        assert set(ui.asset(stage, ids)["staleStatusByPartition"]) == {"FRESH"}, stage


def test_artefacts_made_before_are_recorded_as_reused_by_a_backfill(ui, photoset_env, photo_site, instance, tmp_path):
    ids = photo_site.add_images(3)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    # A fresh instance over the same data: what a Stage-1 import or another tool leaves behind.
    with dg.instance_for_test() as fresh:
        register(defs, fresh)
        fresh_ui = UI(fresh, ui.folder)
        assert fresh_ui.statuses("dinov3_embeddings")["materialized"] == set()

        result = materialize_range(defs, fresh, ["dinov3_embeddings"], ids[0], ids[-1])

        assert result.success
        assert fresh_ui.statuses("dinov3_embeddings")["materialized"] == set(ids)
        reused = [e for e in result.asset_materializations_for_node("image_pipeline")
                  if e.asset_key == dg.AssetKey("dinov3_embeddings")]
        assert len(reused) == len(ids) and all(e.metadata["reused"].value is True for e in reused)
        assert fresh_ui.check_statuses("dinov3_embeddings") == {"passed": set(ids), "failed": set()}

        # Everything recorded now: a second backfill writes no materialization, and each check still
        # passes on the materialization it judged.
        again = materialize_range(defs, fresh, ["dinov3_embeddings"], ids[0], ids[-1])
        assert again.success and not again.asset_materializations_for_node("image_pipeline")
        assert fresh_ui.check_statuses("dinov3_embeddings") == {"passed": set(ids), "failed": set()}


def test_a_migrated_stage1_file_then_a_backfill_shows_the_imported_artefacts_materialized(
    ui, photoset_env, photo_site, instance, data_layout
):
    ids = photo_site.add_images(2)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, ["approved_links", "image_facts"], ids[0], ids[-1]).success
    stage1 = [{"image_id": i, "image_path": f"data/approved/{i}.png", "caption": f"a photo called {i}",
               "dinov3_embedding": [0.5] * 1024} for i in ids]
    data_layout.dataset_jsonl.write_text("".join(json.dumps(r) + "\n" for r in stage1))

    migrated = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey("dataset_jsonl")]).execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("dataset_jsonl")])
    assert migrated.success
    assert ui.statuses("dinov3_embeddings")["materialized"] == set()  # imported on disk, not yet recorded

    loads = dict(LOAD_COUNTS)
    backfill = materialize_range(defs, instance, ["captions", "dinov3_embeddings"], ids[0], ids[-1])

    assert backfill.success
    for stage in ("captions", "dinov3_embeddings"):
        assert ui.statuses(stage)["materialized"] == set(ids), stage
    assert (LOAD_COUNTS["captioner"], LOAD_COUNTS["dinov3"]) == (loads.get("captioner", 0), loads.get("dinov3", 0))
