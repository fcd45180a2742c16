"""Verification: one judgment of every artefact (the same the stages and the dataset use), and the
dataset JSONL's own checks."""

import json
import os

import numpy as np

from photoset_dagster.core.artefacts import read_json
from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.failures import Failure, record_failure
from photoset_dagster.core.validity import judge_npy, raw_identity
from photoset_dagster.core.verify import judge_image, verify_artefacts, verify_dataset_jsonl
from photoset_dagster_tests.fixtures_dataset import ALL_KINDS, T5_ROWS, attention_mask, make_recipes


def states(layout, image_id, recipes):
    return {kind: judgment.state for kind, judgment in judge_image(layout, image_id, recipes).items()}


def test_intact_artefacts_are_valid(layout, dataset_factory):
    dataset_factory.add("img1")

    assert states(layout, "img1", dataset_factory.recipes) == dict.fromkeys(ALL_KINDS, "valid")


def test_an_npy_truncated_in_place_is_invalid(layout, dataset_factory):
    dataset_factory.add("img1")
    path = layout.npy_path("vae_latents", "img1")
    with open(path, "r+b") as handle:  # in place: same inode, the folder's mtime does not move
        handle.truncate(path.stat().st_size - 10)

    judgment = judge_image(layout, "img1", dataset_factory.recipes)["vae_latents"]

    assert judgment.state == "invalid" and "truncated or replaced" in judgment.reason


def test_an_npy_edited_in_place_with_the_same_size_is_caught_by_its_hash(layout, dataset_factory):
    image = dataset_factory.add("img1")
    path = layout.npy_path("dinov3", "img1")
    stat = path.stat()
    altered = image.arrays["dinov3"].copy()
    altered[0] += 1.0
    np.save(path, altered)  # same size, new bytes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))

    judgment = judge_image(layout, "img1", dataset_factory.recipes)["dinov3"]

    assert judgment.state == "invalid" and "does not match its sidecar" in judgment.reason


def test_a_kill_between_the_npy_and_its_sidecar_is_caught_when_the_old_recipe_comes_back(layout, dataset_factory):
    # Recipe A wrote (77-row-like) states; recipe B's .npy replaced the file, then the process died before
    # B's sidecar: A's sidecar now describes B's array. Back on recipe A, the pair must not pass as current.
    image = dataset_factory.add("img1")
    rows_b = np.zeros((T5_ROWS * 2, 16), np.float16)
    np.save(layout.npy_path("t5_hidden", "img1"), rows_b)

    judgment = judge_image(layout, "img1", dataset_factory.recipes)["t5_hidden"]

    assert judgment.state == "invalid", judgment
    assert read_json(layout.json_path("t5_hidden", "img1"))["shape"] == [T5_ROWS, 16]
    assert image.arrays["t5_hidden"].shape == (T5_ROWS, 16)


def test_a_replaced_raw_makes_its_facts_and_everything_from_it_stale(layout, dataset_factory):
    dataset_factory.add("img1")
    raw = layout.raw_path("img1")
    raw.write_bytes(b"\x89PNG\r\n\x1a\n other bytes under the same id")

    judged = states(layout, "img1", dataset_factory.recipes)

    assert judged == {"facts": "stale", "captions": "stale", "dinov3": "stale", "vae_latents": "stale",
                      "t5_hidden": "valid"}  # T5 encodes the caption, whose own staleness shows above
    sha, why = raw_identity(layout, "img1", read_json(layout.json_path("facts", "img1")))
    assert why == "the raw file changed since its facts were recorded" and sha is not None


def test_a_touched_raw_with_the_same_bytes_stays_valid(layout, dataset_factory):
    dataset_factory.add("img1")
    raw = layout.raw_path("img1")
    raw.write_bytes(raw.read_bytes())  # new mtime, same content

    assert states(layout, "img1", dataset_factory.recipes) == dict.fromkeys(ALL_KINDS, "valid")


def test_a_recipe_change_names_the_setting_old_to_new(layout, dataset_factory):
    dataset_factory.add("img1")
    recipes = {**dataset_factory.recipes, "t5_hidden": make_recipes("v2")["t5_hidden"]}

    judgment = judge_npy(layout, "t5_hidden", "img1", recipes["t5_hidden"],
                         judge_image(layout, "img1", recipes)["t5_hidden"].record["inputs"])

    assert judgment.state == "stale"
    assert judgment.reason == "t5_hidden recipe changed (t5.version v1 -> v2)"


def test_missing_files_caption_and_bucket(layout, dataset_factory):
    image = dataset_factory.add("img1")
    os.unlink(layout.json_path("dinov3", "img1"))
    os.unlink(layout.npy_path("vae_latents", "img1"))
    os.unlink(layout.json_path("vae_latents", "img1"))
    dataset_factory.write_caption("img1", "  ", raw_sha256=image.raw_sha256)
    dataset_factory.write_facts(image, aspect_bucket="1x1")

    judged = judge_image(layout, "img1", dataset_factory.recipes)

    assert (judged["dinov3"].state, judged["dinov3"].reason) == ("missing", "dinov3 .npy has no sidecar (an interrupted write)")
    assert judged["vae_latents"].state == "missing"
    assert (judged["captions"].state, judged["captions"].reason) == ("invalid", "caption empty")
    assert (judged["facts"].state, judged["facts"].reason) == ("invalid", "bucket invalid")


def test_verify_lists_by_id_and_separates_cannot_be_processed_from_not_done(layout, dataset_factory):
    for image_id in ("a", "b", "c", "d"):
        dataset_factory.add(image_id)
    dataset_factory.add("e", kinds=("facts",))  # nothing else done yet
    dataset_factory.add("f", kinds=("facts",))  # ... and its captions failed for a reason
    record_failure(layout, Failure("f", "captions", "CaptionError: empty caption"))
    build_dataset_jsonl(layout, ["a", "b", "c", "d"], dataset_factory.recipes)
    path = layout.npy_path("vae_latents", "b")
    path.write_bytes(path.read_bytes()[:20])
    recipes = {**dataset_factory.recipes, "dinov3": make_recipes("v2")["dinov3"]}

    report = verify_artefacts(layout, ["a", "b", "c", "d", "e", "f"], recipes)

    assert not report.ok
    assert list(report.kinds["vae_latents"].invalid) == ["b"]
    assert set(report.kinds["dinov3"].stale) == {"a", "b", "c", "d"}
    assert set(report.kinds["captions"].missing) == {"e"} and report.kinds["captions"].cannot_process == {
        "f": "CaptionError: empty caption"}
    lines = report.summary_lines()
    assert lines[:2] == ["=== Stage 2 Data Verification ===", "verifying 6 images..."]
    assert "  missing captions for e: no caption" in lines
    assert "  cannot be processed captions for f: CaptionError: empty caption" in lines
    assert any(line.startswith("  stale dinov3 for a: dinov3 recipe changed (dinov3.version v1 -> v2)") for line in lines)


def test_verify_passes_when_everything_that_can_be_done_is_done_and_strict_counts_the_rest(layout, dataset_factory):
    dataset_factory.add("a")
    dataset_factory.add("f", kinds=("facts",))
    for stage in ("captions", "dinov3_embeddings", "vae_latents", "t5_hidden"):
        record_failure(layout, Failure("f", stage, "cannot decode f"))
    build_dataset_jsonl(layout, ["a", "f"], dataset_factory.recipes)

    assert verify_artefacts(layout, ["a", "f"], dataset_factory.recipes).ok
    strict = verify_artefacts(layout, ["a", "f"], dataset_factory.recipes, strict=True)
    assert not strict.ok and strict.kinds["dinov3"].cannot_process == {"f": "cannot decode f"}


def test_dataset_jsonl_problems(layout, dataset_factory):
    for image_id in ("a", "b"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)
    good = [json.loads(line) for line in layout.dataset_jsonl.read_text().splitlines()]
    bad_mask = {**good[1], "t5_attention_mask": [1, 2, 0, 0, 0, 0, 0, 0]}
    bad_path = {**good[1], "image_id": "c", "image_path": "elsewhere/c.jpg"}
    no_caption = {key: value for key, value in good[1].items() if key != "caption"}
    no_caption["image_id"] = "d"
    lines = [json.dumps(r) for r in (good[0], good[0], bad_mask, bad_path, no_caption)] + ["{oops"]
    layout.dataset_jsonl.write_text("\n".join(lines) + "\n")

    problems = verify_dataset_jsonl(layout)

    assert problems[0] == "line 2: duplicate image_id a (first on line 1)"
    assert problems[1] == "line 3 (b): t5_attention_mask is not a list of 0/1"
    assert "line 4 (c): image_path 'elsewhere/c.jpg' is not data/approved/c.<ext>" in problems
    assert "line 4 (c): dinov3 npy missing" in problems
    assert "line 5 (d): missing fields caption" in problems
    assert problems[-1] == "line 6: unparsable (not a JSON object)"


def test_the_dataset_builder_leaves_out_what_verify_calls_invalid(layout, dataset_factory):
    for image_id in ("a", "b"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)
    path = layout.npy_path("vae_latents", "b")
    with open(path, "r+b") as handle:  # in place, after the build: the builder's folder check cannot see it
        handle.truncate(path.stat().st_size - 4)

    report = build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipes)

    assert [json.loads(line)["image_id"] for line in layout.dataset_jsonl.read_text().splitlines()] == ["a"]
    assert report.not_ready == {"invalid vae_latents": 1}
    assert verify_artefacts(layout, ["b"], dataset_factory.recipes).kinds["vae_latents"].invalid
    assert attention_mask(5) == read_json(layout.json_path("t5_hidden", "a"))["attention_mask"]
