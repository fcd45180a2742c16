import os
import time

from photoset_dagster.core.artefacts import read_json, text_hash
from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.records import STAGE2_FIELDS, iter_jsonl, write_jsonl_atomic
from photoset_dagster_tests.fixtures_dataset import T5_ROWS, attention_mask, make_recipes


def _records(layout):
    return [record for _, record, _ in iter_jsonl(layout.dataset_jsonl)]


def test_ready_image_record_has_the_seed_fields_then_provenance(layout, dataset_factory):
    image = dataset_factory.add("img1", bucket="832x1216", ext="png", tokens=3)

    report = build_dataset_jsonl(layout, ["img1"], dataset_factory.recipes)

    (record,) = _records(layout)
    assert list(record) == list(STAGE2_FIELDS)
    assert record == {
        "image_id": "img1",
        "image_path": "data/approved/img1.png",
        "caption": image.caption,
        "t5_attention_mask": [1, 1, 1, 0, 0, 0, 0, 0],
        "height": 1216,
        "width": 832,
        "aspect_bucket": "832x1216",
        "format_version": 2,
        "raw_sha256": image.raw_sha256,
        "recipes": {kind: recipe.hash for kind, recipe in dataset_factory.recipes.items()},
        "t5_max_length": T5_ROWS,
        "npy_sha256": {kind: read_json(layout.json_path(kind, "img1"))["npy_sha256"]
                       for kind in ("dinov3", "vae_latents", "t5_hidden")},
    }
    assert "caf\u00e9" in layout.dataset_jsonl.read_text(encoding="utf-8")
    assert report.records == 1 and report.not_ready == {} and report.buckets == {"832x1216": 1}
    assert report.bytes == layout.dataset_jsonl.stat().st_size
    assert report.recipes == {kind: recipe.hash for kind, recipe in dataset_factory.recipes.items()}


def test_not_ready_images_are_counted_by_reason_never_dropped_silently(layout, dataset_factory):
    factory = dataset_factory
    factory.add("ready")
    factory.add("nocaption", kinds=("facts", "dinov3", "vae_latents", "t5_hidden"))
    stale_vae = factory.add("stalevae")
    factory.write_array(
        "vae_latents", "stalevae", stale_vae.arrays["vae_latents"], raw_sha256=stale_vae.raw_sha256,
        extra={"input_size": [64, 48]}, recipe=make_recipes("v2")["vae_latents"],
    )
    recaptioned = factory.add("recaptioned")
    factory.write_caption("recaptioned", "a brand new caption", raw_sha256=recaptioned.raw_sha256)
    short = factory.add("shortmask")
    factory.write_t5("shortmask", short.caption, attention_mask(5, rows=7), rows=T5_ROWS)
    factory.add("nofacts", kinds=("captions", "dinov3", "vae_latents", "t5_hidden"))
    factory.add("nonpy")
    os.unlink(layout.npy_path("dinov3", "nonpy"))
    badbucket = factory.add("badbucket")
    factory.write_facts(badbucket, aspect_bucket="1000x1000")
    factory.add("unlisted")  # on disk but not a registered id: ignored

    ids = ["ready", "nocaption", "stalevae", "recaptioned", "shortmask", "nofacts", "nonpy", "badbucket"]
    report = build_dataset_jsonl(layout, ids, factory.recipes)

    assert [r["image_id"] for r in _records(layout)] == ["ready"]
    assert report.not_ready == {
        "missing captions": 1,
        "stale vae_latents (recipe changed)": 1,
        "stale t5_hidden (made from another caption)": 1,
        "invalid t5_hidden": 1,
        "missing facts": 1,
        "missing dinov3 npy": 1,
        "bucket invalid": 1,
    }
    examples = dict(report.not_ready_examples)
    assert examples["shortmask"] == "t5_hidden: mask length 7 != hidden rows 8"
    # A changed recipe names the settings that differ, old -> new.
    assert examples["stalevae"] == "vae_latents recipe changed (flux_vae.version v2 -> v1)"
    assert set(examples) == set(ids) - {"ready"}
    assert any("missing captions: 1" in line for line in report.summary_lines())


def test_a_recipe_change_makes_every_image_not_ready(layout, dataset_factory):
    dataset_factory.add("a")
    recipes = {**dataset_factory.recipes, "dinov3": make_recipes("v2")["dinov3"]}

    report = build_dataset_jsonl(layout, ["a"], recipes)

    assert report.records == 0 and report.not_ready == {"stale dinov3 (recipe changed)": 1}


def test_records_are_sorted_and_an_unchanged_rebuild_is_byte_identical(layout, dataset_factory):
    for image_id in ("m", "b", "z", "a"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["z", "m", "b", "a"], dataset_factory.recipes)
    first = layout.dataset_jsonl.read_bytes()

    report = build_dataset_jsonl(layout, ["a", "b", "m", "z"], dataset_factory.recipes)

    assert [r["image_id"] for r in _records(layout)] == ["a", "b", "m", "z"]
    assert layout.dataset_jsonl.read_bytes() == first
    assert report.backup is None  # nothing changed, so no backup rotated the useful ones away


def test_cache_skips_unchanged_files_and_picks_up_changes(layout, dataset_factory):
    images = [dataset_factory.add(f"img{n}") for n in range(4)]
    ids = [image.image_id for image in images]
    assert build_dataset_jsonl(layout, ids[:3], dataset_factory.recipes).files_read == 3 * 5
    assert build_dataset_jsonl(layout, ids, dataset_factory.recipes).files_read == 5  # the newly listed id

    assert build_dataset_jsonl(layout, ids, dataset_factory.recipes).files_read == 0

    # Proof that an unchanged key means "not read": same-length bytes written in place, mtime restored.
    path = layout.json_path("captions", "img0")
    stat = path.stat()
    path.write_text(path.read_text().replace("img0", "XXXX"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_dataset_jsonl(layout, ids, dataset_factory.recipes).files_read == 0
    assert _records(layout)[0]["caption"] == images[0].caption

    # A real change (atomic rewrite: new inode) is picked up: that image's five records are read again.
    dataset_factory.write_caption("img2", "changed caption", raw_sha256=images[2].raw_sha256)
    dataset_factory.write_t5("img2", "changed caption", images[2].mask)
    report = build_dataset_jsonl(layout, ids, dataset_factory.recipes)
    assert report.files_read == 5
    assert _records(layout)[2]["caption"] == "changed caption"
    assert report.backup is not None and report.backup.exists()

    assert build_dataset_jsonl(layout, ids, dataset_factory.recipes, use_cache=False).files_read == 20


def test_removed_artefact_and_unreadable_cache_are_handled(layout, dataset_factory):
    for image_id in ("a", "b"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)
    os.unlink(layout.json_path("t5_hidden", "b"))
    (layout.state_dir / "dataset_cache" / "meta.json").write_text("{truncated")

    report = build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)

    assert report.records == 1 and report.not_ready == {"missing t5_hidden": 1}
    assert report.files_read == 9  # the unreadable cache is ignored: everything read again
    assert build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes).files_read == 0


def _age_folders(layout, seconds=60):
    """Backdate the artefact folders, as if the last write was a while ago (their state is then remembered)."""
    past = time.time_ns() - seconds * 1_000_000_000
    for kind in ("facts", "captions", "dinov3", "vae_latents", "t5_hidden"):
        os.utime(layout.kind_dir(kind), ns=(past, past))


def test_settled_folders_are_not_listed_until_something_is_renamed_into_them(layout, dataset_factory, monkeypatch):
    images = [dataset_factory.add(f"img{n}") for n in range(3)]
    ids = [image.image_id for image in images]
    _age_folders(layout)
    build_dataset_jsonl(layout, ids, dataset_factory.recipes)
    listed = []  # artefact folders listed (the builder lists them by open descriptor)
    real_scandir = os.scandir
    monkeypatch.setattr(
        os, "scandir", lambda folder: (isinstance(folder, int) and listed.append(folder)) or real_scandir(folder)
    )

    assert build_dataset_jsonl(layout, ids, dataset_factory.recipes).files_read == 0
    assert listed == []

    dataset_factory.write_caption("img1", "new words", raw_sha256=images[1].raw_sha256)
    dataset_factory.write_t5("img1", "new words", images[1].mask)
    report = build_dataset_jsonl(layout, ids, dataset_factory.recipes)

    assert report.files_read == 5 and _records(layout)[1]["caption"] == "new words"
    assert len(listed) == 2  # only the captions and t5_hidden folders changed


def test_a_jsonl_replaced_by_someone_else_is_rewritten_from_the_cache(layout, dataset_factory):
    for image_id in ("a", "b"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)
    expected = layout.dataset_jsonl.read_bytes()
    write_jsonl_atomic(layout.dataset_jsonl, [{"image_id": "a"}])  # e.g. a prune, or a hand edit

    report = build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)

    assert layout.dataset_jsonl.read_bytes() == expected and report.files_read == 0


def test_t5_is_current_only_for_the_caption_it_encodes(layout, dataset_factory):
    image = dataset_factory.add("a")
    sidecar = read_json(layout.json_path("t5_hidden", "a"))
    assert sidecar["inputs"] == {"caption_sha256": text_hash(image.caption)}
    dataset_factory.write_caption("a", "new", raw_sha256=image.raw_sha256)
    assert build_dataset_jsonl(layout, ["a"], dataset_factory.recipes).records == 0

    dataset_factory.write_t5("a", "new", image.mask)

    assert build_dataset_jsonl(layout, ["a"], dataset_factory.recipes).records == 1
