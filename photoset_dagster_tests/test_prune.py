import os
import threading

import pytest

from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.lock import DataLockTimeout, data_lock
from photoset_dagster.core.prune import PruneRefused, execute_prune, plan_prune
from photoset_dagster.core.records import iter_jsonl
from photoset_dagster_tests.fixtures_dataset import tree_snapshot

IDS = [f"img{n:02d}" for n in range(20)]


@pytest.fixture
def dataset(layout, dataset_factory):
    for n, image_id in enumerate(IDS):
        dataset_factory.add(image_id, bucket="1216x832" if n == 0 else "1024x1024")
    layout.npy_path("dinov3_patches", "img00").write_bytes(b"patches")
    build_dataset_jsonl(layout, IDS, dataset_factory.recipes)
    with open(layout.dataset_jsonl, "a") as handle:
        handle.write("{a malformed line survives\n")
    return IDS


def _jsonl_ids(layout):
    return [record["image_id"] for _, record, _ in iter_jsonl(layout.dataset_jsonl) if record]


def _files_of(layout, image_id):
    made = [path for path in layout.derived_paths(image_id) if path.parent != layout.thumbnails_dir]
    return [layout.approved_link(image_id, "jpg"), layout.raw_path(image_id), *made]


def test_plan_lists_everything_of_removed_ids(layout, dataset):
    plan = plan_prune(layout, IDS[1:], listing_complete=True)

    assert plan.removed_ids == ["img00"]
    assert set(plan.files) == set(_files_of(layout, "img00"))  # link, raw, facts, captions, npys, sidecars, patches
    assert plan.jsonl_records == 1 and plan.known_ids == 20 and plan.fraction == 0.05
    assert plan.affected_buckets == {"1216x832"} and plan.broken_links == []
    assert plan.summary_lines()[0] == "Discovery Results:"


def test_dry_run_changes_nothing_and_reports_what_a_real_run_does(layout, dataset):
    plan = plan_prune(layout, IDS[1:], listing_complete=True)
    before = tree_snapshot(layout.root)

    dry = execute_prune(layout, plan, dry_run=True)

    assert tree_snapshot(layout.root) == before
    real = execute_prune(layout, plan)
    assert (dry.files_removed, dry.records_removed, dry.links_removed) == (
        real.files_removed, real.records_removed, real.links_removed
    )
    assert dry.summary_lines()[0].startswith("Summary (dry run")


def test_real_run_removes_only_the_unapproved_image(layout, dataset):
    plan = plan_prune(layout, IDS[1:], listing_complete=True)

    report = execute_prune(layout, plan)

    assert not any(os.path.lexists(path) for path in _files_of(layout, "img00"))
    assert all(os.path.lexists(path) for path in _files_of(layout, "img01")[:-1])  # it has no patches
    assert _jsonl_ids(layout) == IDS[1:]
    assert layout.dataset_jsonl.read_text().endswith("{a malformed line survives\n")
    assert report.removed_ids == ["img00"] and report.affected_buckets == {"1216x832"}
    assert report.records_removed == 1 and report.links_removed == 1
    assert report.files_removed == {
        "approved links": 1, "raw files": 1, "facts": 1, "captions": 1, "dinov3": 1, "vae_latents": 1,
        "t5_hidden": 1, "sidecars": 3, "dinov3_patches": 1,
    }
    lines = report.summary_lines()
    assert "  JSONL records removed:       1" in lines and "  Total .npy files deleted:    4" in lines
    assert plan_prune(layout, IDS[1:], listing_complete=True).removed_ids == []


def test_mass_deletion_is_refused_unless_forced(layout, dataset):
    plan = plan_prune(layout, IDS[3:], listing_complete=True)  # 15% of the ids
    before = tree_snapshot(layout.root)

    with pytest.raises(PruneRefused, match=r"3 of 20 .*15\.0% > 10\.0%.*pass force to override"):
        execute_prune(layout, plan)
    with pytest.raises(PruneRefused):
        execute_prune(layout, plan, dry_run=True)
    assert tree_snapshot(layout.root) == before

    assert execute_prune(layout, plan, force=True).removed_ids == IDS[:3]
    assert _jsonl_ids(layout) == IDS[3:]


def test_an_empty_approved_list_never_wipes_the_dataset(layout, dataset):
    plan = plan_prune(layout, [], listing_complete=True)
    assert plan.fraction == 1.0

    with pytest.raises(PruneRefused, match="approved list is empty"):
        execute_prune(layout, plan, max_fraction=1.0)
    assert _jsonl_ids(layout) == IDS


def test_an_incomplete_listing_is_refused(layout, dataset):
    with pytest.raises(PruneRefused, match="incomplete"):
        plan_prune(layout, IDS[1:], listing_complete=False)


def test_broken_link_of_an_approved_id_goes_but_its_data_stays(layout, dataset):
    os.unlink(layout.raw_path("img05"))
    plan = plan_prune(layout, IDS, listing_complete=True)
    assert plan.removed_ids == [] and plan.broken_links == [layout.approved_link("img05", "jpg")]

    report = execute_prune(layout, plan)

    assert not os.path.lexists(layout.approved_link("img05", "jpg"))
    assert all(path.exists() for path in layout.derived_paths("img05")[:-2])  # all but patches, thumbnail (none made)
    assert "img05" in _jsonl_ids(layout)
    assert report.files_removed == {"broken links": 1} and report.links_removed == 1


def test_a_raw_that_links_out_of_the_root_counts_as_missing(layout, dataset, tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"not ours")
    os.unlink(layout.raw_path("img05"))
    os.symlink(outside, layout.raw_path("img05"))

    plan = plan_prune(layout, IDS, listing_complete=True)

    assert plan.broken_links == [layout.approved_link("img05", "jpg")]
    execute_prune(layout, plan)
    assert outside.read_bytes() == b"not ours"


def test_prune_waits_for_running_passes(layout, dataset):
    plan = plan_prune(layout, IDS[1:], listing_complete=True)
    holding, release = threading.Event(), threading.Event()

    def running_pass():
        with data_lock(layout.lock_path, exclusive=False):
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=running_pass)
    worker.start()
    holding.wait(10)
    try:
        with pytest.raises(DataLockTimeout):
            execute_prune(layout, plan, lock_timeout_s=0.3)
        assert layout.raw_path("img00").exists()
    finally:
        release.set()
        worker.join()
    assert execute_prune(layout, plan).removed_ids == ["img00"]


def test_nothing_outside_the_data_root_is_touched(layout, dataset, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.jpg").write_bytes(b"keep me")
    os.symlink(outside / "precious.jpg", layout.approved_dir / "img00.png")  # a removed id's link leading out
    # a derived folder that is a link to another disk: its files are not inside the data root
    (outside / "img00.npy").write_bytes(b"patches elsewhere")
    (outside / "img01.npy").write_bytes(b"patches elsewhere")
    os.unlink(layout.npy_path("dinov3_patches", "img00"))
    os.rmdir(layout.patches_dir)
    os.symlink(outside, layout.patches_dir)
    plan = plan_prune(layout, IDS[1:], listing_complete=True)
    assert layout.approved_link("img00", "png") in plan.files

    report = execute_prune(layout, plan)

    assert not os.path.lexists(layout.approved_link("img00", "png"))
    assert (outside / "precious.jpg").read_bytes() == b"keep me"
    assert (outside / "img00.npy").read_bytes() == b"patches elsewhere"
    outside_file = str(layout.npy_path("dinov3_patches", "img00"))
    assert report.not_removed == {outside_file: "its folder lies outside the data root"}
