import json
import os

import numpy as np
import pytest

from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.verify import EXPECTED, check_artefact, verify_artefacts, verify_dataset_jsonl
from photoset_dagster_tests.fixtures_dataset import ALL_KINDS, T5_ROWS, attention_mask, make_recipes


@pytest.fixture
def image(dataset_factory):
    return dataset_factory.add("img1")


def test_intact_artefacts_are_valid(layout, image):
    assert {kind: check_artefact(layout, kind, "img1") for kind in ALL_KINDS} == dict.fromkeys(ALL_KINDS)


def test_truncated_npy_is_unloadable(layout, image):
    path = layout.npy_path("vae_latents", "img1")
    path.write_bytes(path.read_bytes()[:-10])

    assert check_artefact(layout, "vae_latents", "img1").startswith("unloadable: ")


def test_array_not_matching_its_sidecar_is_caught(layout, image):
    np.save(layout.npy_path("dinov3", "img1"), np.zeros(31, np.float32))
    np.save(layout.npy_path("vae_latents", "img1"), np.zeros((16, 6, 8), np.float32))

    assert check_artefact(layout, "dinov3", "img1") == "shape (31,) != recorded (32,)"
    assert check_artefact(layout, "vae_latents", "img1") == "dtype float32 != recorded float16"


def test_shape_not_matching_the_recipe_geometry_is_caught(layout, image, dataset_factory):
    # a consistent sidecar does not make a latent of the wrong size valid: (16, h/8, w/8) from input_size
    dataset_factory.write_array(
        "vae_latents", "img1", np.zeros((16, 8, 8), np.float16), raw_sha256=image.raw_sha256,
        extra={"input_size": [64, 48]},
    )

    assert check_artefact(layout, "vae_latents", "img1") == "shape (16, 8, 8) != expected (16, 6, 8)"


def test_nan_values_are_caught(layout, image):
    array = image.arrays["t5_hidden"].copy()
    array[3, 2] = np.nan
    np.save(layout.npy_path("t5_hidden", "img1"), array)

    assert check_artefact(layout, "t5_hidden", "img1") == "non-finite values"


def test_mask_not_matching_hidden_rows_is_caught(layout, image, dataset_factory):
    dataset_factory.write_t5("img1", image.caption, attention_mask(5, rows=T5_ROWS - 1), rows=T5_ROWS)

    assert check_artefact(layout, "t5_hidden", "img1") == f"mask length {T5_ROWS - 1} != hidden rows {T5_ROWS}"


def test_missing_files_caption_and_bucket(layout, image, dataset_factory):
    os.unlink(layout.json_path("dinov3", "img1"))
    os.unlink(layout.npy_path("vae_latents", "img1"))
    dataset_factory.write_caption("img1", "  ", raw_sha256=image.raw_sha256)
    dataset_factory.write_facts(image, aspect_bucket="1x1")

    assert check_artefact(layout, "dinov3", "img1") == "sidecar missing"
    assert check_artefact(layout, "vae_latents", "img1") == "missing"
    assert check_artefact(layout, "captions", "img1") == "caption empty"
    assert check_artefact(layout, "facts", "img1") == "bucket invalid"
    assert check_artefact(layout, "t5_hidden", "nosuch") == "missing"


def test_patches_are_checked_against_the_dinov3_hidden_size(layout, image):
    np.save(layout.npy_path("dinov3_patches", "img1"), np.ones((12, 32), np.float32))
    assert check_artefact(layout, "dinov3_patches", "img1") is None

    np.save(layout.npy_path("dinov3_patches", "img1"), np.ones((12, 31), np.float32))
    assert check_artefact(layout, "dinov3_patches", "img1") == "shape (12, 31) != expected (None, 32)"
    assert set(EXPECTED) == {"dinov3", "vae_latents", "t5_hidden", "dinov3_patches"}


def test_verify_report_counts_valid_invalid_missing_and_stale(layout, dataset_factory):
    for image_id in ("a", "b", "c", "d"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b", "c", "d"], dataset_factory.recipe_hashes)
    path = layout.npy_path("vae_latents", "b")
    path.write_bytes(path.read_bytes()[:20])
    os.unlink(layout.npy_path("t5_hidden", "c"))
    hashes = {**dataset_factory.recipe_hashes, "dinov3": make_recipes("v2")["dinov3"].hash}

    report = verify_artefacts(layout, ["a", "b", "c", "d"], hashes)

    assert not report.ok
    assert report.kinds["facts"].valid == 4 and report.kinds["captions"].valid == 4
    assert list(report.kinds["vae_latents"].invalid) == ["b"] and report.kinds["vae_latents"].valid == 3
    assert report.kinds["t5_hidden"].missing == ["c"]
    assert set(report.kinds["dinov3"].stale) == {"a", "b", "c", "d"} and report.kinds["dinov3"].valid == 0
    assert report.dataset_problems == ["line 3 (c): t5_hidden npy missing"]
    lines = report.summary_lines()
    assert lines[:2] == ["=== Stage 2 Data Verification ===", "verifying 4 images..."]
    vae = lines.index("\nVAE latents:")
    assert lines[vae + 1 : vae + 5] == ["  valid: 3", "  invalid: 1", "  missing: 0", "  stale: 0"]
    assert any(line.startswith("  invalid vae_latents for b: unloadable: ") for line in lines)


def test_intact_dataset_verifies_ok(layout, dataset_factory):
    dataset_factory.add("a")
    build_dataset_jsonl(layout, ["a"], dataset_factory.recipe_hashes)

    report = verify_artefacts(layout, ["a"], dataset_factory.recipe_hashes)

    assert report.ok, report.summary_lines()


def test_dataset_jsonl_problems(layout, dataset_factory):
    for image_id in ("a", "b"):
        dataset_factory.add(image_id)
    build_dataset_jsonl(layout, ["a", "b"], dataset_factory.recipe_hashes)
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
