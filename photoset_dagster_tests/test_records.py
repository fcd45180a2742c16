import json
import os

import numpy as np
import pytest

from photoset_dagster.core.artefacts import read_json, sha256_file
from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.records import (
    backup_paths,
    holds_stage1_records,
    is_stage1,
    iter_jsonl,
    migrate_stage1,
    write_jsonl_atomic,
)
from photoset_dagster_tests.fixtures_dataset import tree_snapshot


def test_jsonl_round_trip_skips_blank_lines_and_flags_malformed_ones(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [
        {"image_id": "a", "caption": "caf\u00e9 \u2603", "mask": [1, 0]},
        {"image_id": "b", "nested": {"x": None}},
    ]
    write_jsonl_atomic(path, records)
    assert "caf\u00e9" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    path.write_bytes(path.read_bytes() + b"\n   \n{broken\n[1, 2]\n")

    rows = list(iter_jsonl(path))

    assert [(n, obj) for n, obj, _ in rows] == [(1, records[0]), (2, records[1]), (5, None), (6, None)]
    assert [raw for _, _, raw in rows[2:]] == ["{broken", "[1, 2]"]


def test_raw_lines_are_written_verbatim_even_when_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"image_id": "a"}\n\xff\xfe not json\n')
    kept = [raw for _, _, raw in iter_jsonl(path)]

    write_jsonl_atomic(tmp_path / "copy.jsonl", kept)

    assert (tmp_path / "copy.jsonl").read_bytes() == path.read_bytes()


def test_backups_keep_each_previous_version_and_are_bounded(tmp_path):
    path = tmp_path / "approved_image_dataset.jsonl"
    assert write_jsonl_atomic(path, [{"v": 0}], backups=3) is None  # nothing to back up yet
    made = [write_jsonl_atomic(path, [{"v": version}], backups=3) for version in range(1, 6)]

    kept = backup_paths(path)
    assert kept == made[-3:]  # the newest three, oldest first; older ones deleted
    assert [json.loads(p.read_text()) for p in kept] == [{"v": 2}, {"v": 3}, {"v": 4}]
    assert all(p.name.startswith("approved_image_dataset.") and p.name.endswith(".bak.jsonl") for p in kept)
    assert json.loads(path.read_text()) == {"v": 5}
    assert len(set(kept)) == 3  # unique names although all were made within the same second


def test_identical_content_is_not_rewritten_and_makes_no_backup(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl_atomic(path, [{"v": 1}])
    before = os.stat(path)

    assert write_jsonl_atomic(path, [{"v": 1}]) is None

    assert backup_paths(path) == []
    assert os.stat(path).st_ino == before.st_ino
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_is_stage1():
    assert is_stage1({"image_path": "data/approved/a.jpg", "dinov3_embedding": [0.1], "caption": "x"})
    assert is_stage1({"image_id": "a", "format_version": 1})
    assert is_stage1({"image_id": "a", "format_version": 2, "dinov3_embedding": []})
    assert is_stage1({"image_id": "a", "format_version": 2})  # the original's Stage 2: no provenance
    assert not is_stage1({"image_id": "a", "format_version": 2, "recipes": {"dinov3": "h"}})


# --- migration ------------------------------------------------------------------------------------


def _embedding(seed, dims=1024):
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32).tolist()


@pytest.fixture
def stage1(layout):
    """A Stage-1 JSONL like the original's, with the ways real files go wrong."""
    for image_id in ("good1", "nocap", "badvec", "twice"):
        layout.raw_path(image_id).write_bytes(image_id.encode() * 10)
    def stage1_line(path, seed, **fields):
        return json.dumps({"image_path": f"data/approved/{path}", "dinov3_embedding": _embedding(seed), **fields})

    lines = [
        stage1_line("good1.jpg", 1, caption="a dog", t5_attention_mask=[1] * 5 + [0] * 72, height=800, width=600),
        stage1_line("nocap.png", 2, image_id="nocap"),
        stage1_line("badvec.jpg", 3, caption="short", dinov3_embedding=_embedding(3)[:10]),
        stage1_line("bad name.jpg", 4, caption="x"),
        stage1_line("noraw.jpg", 5, caption="no raw"),
        json.dumps({"image_id": "stage2", "format_version": 2, "caption": "already", "recipes": {}}),
        "{not json",
        stage1_line("twice.jpg", 6, caption="one"),
        stage1_line("twice.png", 7, caption="two"),
    ]
    layout.dataset_jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_the_originals_stage2_captions_and_embeddings_are_imported_not_replaced(layout, recipes):
    layout.raw_path("seed2").write_bytes(b"raw bytes")
    embedding = np.asarray(_embedding(9), np.float32)
    np.save(layout.npy_path("dinov3", "seed2"), embedding)  # the original wrote .npy files without sidecars
    record = {"image_path": "data/approved/seed2.jpg", "image_id": "seed2", "caption": "a cat on a sofa",
              "t5_attention_mask": [1] * 7 + [0] * 70, "height": 10, "width": 10, "aspect_bucket": "1024x1024",
              "format_version": 2}
    layout.dataset_jsonl.write_text(json.dumps(record) + "\n", encoding="utf-8")

    report = migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"])

    assert report.migrated == ["seed2"]
    assert read_json(layout.json_path("captions", "seed2"))["caption"] == "a cat on a sofa"
    assert np.array_equal(np.load(layout.npy_path("dinov3", "seed2")), embedding)
    assert read_json(layout.json_path("dinov3", "seed2"))["recipe_hash"] == recipes["dinov3"].hash
    assert report.backup is not None and report.backup.read_text() == json.dumps(record) + "\n"


def test_migration_moves_inline_payload_into_artefacts_and_loses_nothing(layout, recipes, stage1):
    original = layout.dataset_jsonl.read_bytes()

    report = migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"])

    assert report.migrated == ["good1", "nocap", "twice"]
    assert report.already_stage2 == 1
    assert set(report.failed) == {"badvec", "line 4", "noraw", "line 7", "line 9"}
    assert "10 values, expected 1024" in report.failed["badvec"]
    assert "invalid image id" in report.failed["line 4"]
    assert report.failed["noraw"].startswith("raw file missing")
    assert "duplicate" in report.failed["line 9"]

    embedding = np.load(layout.npy_path("dinov3", "good1"))
    assert embedding.dtype == np.float32 and np.array_equal(embedding, np.asarray(_embedding(1), np.float32))
    sidecar = read_json(layout.json_path("dinov3", "good1"))
    assert sidecar["recipe_hash"] == recipes["dinov3"].hash
    assert sidecar["inputs"] == {"raw_sha256": sha256_file(layout.raw_path("good1"))}
    assert sidecar["origin"] == "stage1-import" and sidecar["patches"] is False
    caption = read_json(layout.json_path("captions", "good1"))
    assert caption["caption"] == "a dog" and caption["backend"] == "stage1-import"
    assert caption["recipe_hash"] == recipes["captions"].hash
    assert not layout.json_path("captions", "nocap").exists()  # no caption to import: the captions pass makes one
    assert not layout.npy_path("dinov3", "badvec").exists()
    assert read_json(layout.json_path("captions", "badvec"))["caption"] == "short"  # the caption is not lost
    # imported, but without a raw hash it is never current, so it will be recomputed once the raw exists
    assert read_json(layout.json_path("dinov3", "noraw"))["inputs"] == {}
    assert read_json(layout.json_path("captions", "twice"))["caption"] == "one"

    # lossless: the original verbatim, every record not fully imported verbatim in the remaining file
    assert report.backup.read_bytes() == original
    assert report.backup.name.startswith("approved_image_dataset.stage1.")
    assert report.remaining.read_text(encoding="utf-8").splitlines() == [stage1[i] for i in (2, 3, 4, 6, 8)]
    # the Stage-1 file is no longer where the builder looks, so it is not detected (or migrated) again
    assert not holds_stage1_records(layout.dataset_jsonl)
    assert migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"]).migrated == []
    assert any("failed badvec" in line for line in report.summary_lines())


def test_migration_never_overwrites_a_current_artefact(layout, recipes, stage1, dataset_factory):
    existing = dataset_factory.add("good1", caption="a newer caption")

    migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"], embedding_dim=1024)

    assert np.array_equal(np.load(layout.npy_path("dinov3", "good1")), existing.arrays["dinov3"])
    assert read_json(layout.json_path("captions", "good1"))["caption"] == "a newer caption"


def test_migration_dry_run_changes_nothing(layout, recipes, stage1):
    before = tree_snapshot(layout.root)

    report = migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"], dry_run=True)

    assert tree_snapshot(layout.root) == before
    assert report.migrated == ["good1", "nocap", "twice"] and "badvec" in report.failed
    assert report.backup is None and report.remaining is None


def test_builder_writes_stage2_after_migration(layout, recipes, stage1, dataset_factory):
    migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"])

    report = build_dataset_jsonl(layout, ["good1", "nocap"], dataset_factory.recipes)

    assert report.records == 0 and report.not_ready == {"missing facts": 2}
    assert layout.dataset_jsonl.read_text() == "" and not holds_stage1_records(layout.dataset_jsonl)
