"""The pipeline through Dagster: photo list -> partitions, range runs of every stage with one model
load per run, single-pass runs, catch-up of scattered and stale images, dataset and shards, prune."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np

from photoset_dagster.core.artefacts import read_json
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME, image_ids
from photoset_dagster.stages.base import STAGES
from photoset_dagster.models.common import LOAD_COUNTS
from photoset_dagster_tests.fixtures_dagster import (
    build_defs,
    materialize_range,
    materialized_keys,
    run_job,
)
from photoset_dagster_tests.fixtures_http import image_bytes

MODEL_FAMILIES = ("dinov3", "captioner", "flux_vae", "t5")


def register(defs, instance):
    result = defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance)
    assert result.success
    return instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)


def loads_during(action):
    before = {family: LOAD_COUNTS[family] for family in MODEL_FAMILIES}
    outcome = action()
    return outcome, {family: LOAD_COUNTS[family] - before[family] for family in MODEL_FAMILIES}


def test_definitions_load(photoset_env):
    defs = build_defs(photoset_env)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"photo_list", *STAGES, "dataset_jsonl", "webdataset_shards"} <= keys
    for job in ("image_pipeline_job", "catch_up_job", "prune_job", "verify_job", "refresh_photo_list_job"):
        assert defs.resolve_job_def(job).description
    assert defs.resolve_sensor_def("photo_list_sensor").description
    assert defs.resolve_schedule_def("nightly_sync").cron_schedule == "0 2 * * *"


def test_photo_list_registers_ids_in_bulk_and_reports_invalid_items(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(12)
    photo_site.publish(ids)
    pages = photo_site.server  # one bad item on an extra page
    items = [{"filename": image_id, "exportable_url": pages.file_url(image_id)} for image_id in ids]
    pages.set_pages([items[:6], items[6:] + [{"filename": "../escape"}, "not an object"]])
    defs = build_defs(photoset_env)
    result = defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance)
    assert result.success
    assert instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
    materialization = result.asset_materializations_for_node("photo_list")[0]
    assert materialization.metadata["invalid_items"].value == 2
    assert materialization.metadata["complete"].value is True
    snapshot = json.loads(data_layout.photo_list_path.read_text())
    assert len(snapshot["items"]) == 12
    assert not (data_layout.root.parent / "escape").exists()


def test_range_run_does_every_stage_with_one_model_load_each(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(50)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)

    result, loads = loads_during(lambda: materialize_range(defs, instance, STAGES, ids[0], ids[-1]))

    assert result.success
    assert loads == {family: 1 for family in MODEL_FAMILIES}
    for stage in STAGES:
        assert sorted(materialized_keys(result, stage)) == ids, stage
    # Two different buckets, real artefact shapes.
    buckets = {read_json(data_layout.json_path("facts", i))["aspect_bucket"] for i in ids}
    assert len(buckets) >= 3
    t5 = np.load(data_layout.npy_path("t5_hidden", ids[0]))
    assert t5.shape == (77, 1024) and t5.dtype == np.float16
    assert np.load(data_layout.npy_path("dinov3", ids[1])).shape == (1024,)

    # Re-running a complete range does no work and loads nothing.
    again, loads = loads_during(lambda: materialize_range(defs, instance, STAGES[1:], ids[0], ids[-1]))
    assert again.success and loads == {family: 0 for family in MODEL_FAMILIES}


def test_single_pass_run_loads_only_its_model(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(4)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, ["approved_links"], ids[0], ids[-1]).success

    result, loads = loads_during(lambda: materialize_range(defs, instance, ["vae_latents"], ids[0], ids[-1]))

    assert result.success
    assert loads == {"dinov3": 0, "captioner": 0, "flux_vae": 1, "t5": 0}
    assert sorted(materialized_keys(result, "vae_latents")) == ids
    assert not any(data_layout.kind_dir("captions").iterdir())


def test_catch_up_finds_scattered_missing_and_stale_work_in_one_run(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(12)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    scattered = [ids[1], ids[6], ids[10]]
    for image_id in scattered:
        data_layout.npy_path("vae_latents", image_id).unlink()
    runs_before = len(instance.get_run_records())

    result = run_job(defs, instance, "catch_up_job", "catch_up", {"passes": ["vae"]})

    assert result.success
    assert len(instance.get_run_records()) == runs_before + 1
    assert sorted(materialized_keys(result, "vae_latents")) == sorted(scattered)
    assert all(data_layout.npy_path("vae_latents", i).is_file() for i in scattered)


def test_recipe_change_recomputes_exactly_the_affected_artefacts(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(6)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success

    changed = build_defs({**photoset_env, "PHOTOSET_T5_MAX_LENGTH": "32"})
    result, loads = loads_during(lambda: run_job(changed, instance, "catch_up_job", "catch_up", {"passes": ["all"]}))

    assert result.success
    assert loads == {"dinov3": 0, "captioner": 0, "flux_vae": 0, "t5": 1}
    assert sorted(materialized_keys(result, "t5_hidden")) == ids
    for stage in ("image_facts", "captions", "dinov3_embeddings", "vae_latents"):
        assert materialized_keys(result, stage) == []
    assert np.load(data_layout.npy_path("t5_hidden", ids[0])).shape == (32, 1024)


def test_new_bytes_under_the_same_filename_recompute_that_image_only(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(5)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    raw = data_layout.raw_path(ids[2])
    raw.write_bytes(image_bytes("PNG", (48, 32), seed=999))

    result = run_job(defs, instance, "catch_up_job", "catch_up", {"passes": ["all"]})

    assert result.success
    for stage in ("image_facts", "captions", "dinov3_embeddings", "vae_latents"):
        assert materialized_keys(result, stage) == [ids[2]], stage
    assert read_json(data_layout.json_path("facts", ids[2]))["aspect_bucket"] == "1216x832"


def test_a_corrupt_image_fails_alone_with_its_reason_and_the_run_says_so(photoset_env, photo_site, instance):
    ids = photo_site.add_images(4)
    broken = image_bytes("PNG", (48, 48), seed=5)
    photo_site.server.set_file(ids[3], broken[: len(broken) // 2])  # valid magic bytes, truncated data
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)

    result = materialize_range(defs, instance, STAGES, ids[0], ids[-1], raise_on_error=False)

    assert not result.success  # run-failure sensors and alerts fire
    assert sorted(materialized_keys(result, "t5_hidden")) == ids[:3]
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.user_failure_data.description
    assert message.startswith("1 of 4 image(s) failed (image_facts); e.g. img0003: ImageDecodeError")
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert {(e.asset_key.to_user_string(), e.partition) for e in failed_checks} == {
        (stage, ids[3]) for stage in STAGES[1:]}
    reasons = {e.asset_key.to_user_string(): e.description for e in failed_checks}
    assert "cannot decode" in reasons["image_facts"]
    assert reasons["t5_hidden"].startswith("image_facts failed: ImageDecodeError")

    tolerated = materialize_range(defs, instance, STAGES, ids[0], ids[-1],
                                  run_config={"ops": {"image_pipeline": {"config": {"tolerate_failures": True}}}})
    assert tolerated.success


def test_dataset_and_shards_then_prune_removes_everything_of_a_delisted_image(
    photoset_env, photo_site, instance, data_layout
):
    ids = photo_site.add_images(12)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    built = run_job(defs, instance, "catch_up_job", "catch_up", {"passes": ["all"], "build_dataset": True})
    assert built.success
    records = [json.loads(line) for line in data_layout.dataset_jsonl.read_text().splitlines()]
    assert [r["image_id"] for r in records] == ids
    assert list(data_layout.shards_dir.glob("bucket_*/shard-000000.tar"))

    gone = ids[4]
    photo_site.publish([i for i in ids if i != gone])
    dry = run_job(defs, instance, "prune_job", "prune", {"dry_run": True, "max_fraction": 0.5})
    assert dry.success and data_layout.npy_path("vae_latents", gone).exists()

    pruned = run_job(defs, instance, "prune_job", "prune", {"max_fraction": 0.5})

    assert pruned.success
    assert gone not in instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    assert not any(p.exists() or p.is_symlink() for p in data_layout.derived_paths(gone))
    assert not data_layout.raw_path(gone).exists()
    remaining = [json.loads(line)["image_id"] for line in data_layout.dataset_jsonl.read_text().splitlines()]
    assert gone not in remaining and len(remaining) == 11


def test_prune_refuses_a_mass_deletion_and_an_incomplete_list(photoset_env, photo_site, instance, data_layout):
    from photoset_dagster.demo.server import Fault

    ids = photo_site.add_images(10)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, ["approved_links"], ids[0], ids[-1]).success

    photo_site.publish([])  # the remote list came back empty
    refused = run_job(defs, instance, "prune_job", "prune", {}, raise_on_error=False)
    assert not refused.success
    assert len(list(data_layout.approved_dir.iterdir())) == 10

    photo_site.publish(ids[:9])
    photo_site.server.add_fault("/photos.json?page=1", Fault("status", status=503, times=-1))
    incomplete = run_job(defs, instance, "prune_job", "prune", {}, raise_on_error=False)
    assert not incomplete.success
    assert len(list(data_layout.approved_dir.iterdir())) == 10


CHECKED = {"captions": "captions", "dinov3_embeddings": "dinov3", "vae_latents": "vae_latents", "t5_hidden": "t5_hidden"}


def test_artefact_checks_alone_judge_each_partition_and_compute_nothing(photoset_env, photo_site, instance, data_layout):
    ids = photo_site.add_images(5)
    photo_site.publish(ids)
    defs = build_defs(photoset_env)
    register(defs, instance)
    assert materialize_range(defs, instance, STAGES, ids[0], ids[-1]).success
    # One corrupt artefact per stage, each on a different image.
    for image_id, kind in zip(ids, CHECKED.values()):
        target = data_layout.json_path(kind, image_id) if kind == "captions" else data_layout.npy_path(kind, image_id)
        target.write_bytes(target.read_bytes()[:20])
    check_keys = [dg.AssetCheckKey(dg.AssetKey(stage), "artefact_valid") for stage in CHECKED]
    check_job = dg.define_asset_job("check_job", selection=dg.AssetSelection.checks(*check_keys), partitions_def=image_ids)
    with_job = dg.Definitions.merge(defs, dg.Definitions(jobs=[check_job]))

    result, loads = loads_during(lambda: with_job.resolve_job_def("check_job").execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]},
        raise_on_error=False,
    ))

    assert loads == {family: 0 for family in MODEL_FAMILIES}
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == len(CHECKED) * len(ids)  # one per image and check: a range is not one verdict
    failed = {(e.asset_key.to_user_string(), e.partition) for e in evaluations if not e.passed}
    assert failed == {(stage, image_id) for image_id, stage in zip(ids, CHECKED)}
