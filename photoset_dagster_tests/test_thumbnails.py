"""Thumbnails: upright, small, made once, remade only when the raw changes; a bad raw fails alone."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from photoset_dagster.core.layout import DataLayout
from photoset_dagster.core.thumbnails import (
    THUMBNAIL_MAX_SIDE,
    make_thumbnail,
    make_thumbnails,
    thumbnail_is_current,
)

EXIF_ORIENTATION = 0x0112


def jpeg_bytes(size: tuple[int, int], colour: tuple[int, int, int], orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.new("RGB", size, colour).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def replace_raw(layout: DataLayout, image_id: str, data: bytes) -> None:
    """What a download does: a new file renamed over the old one. Its mtime is moved one second on
    because a re-download comes later than the first one (and file times only advance per clock tick)."""
    raw = layout.raw_path(image_id)
    old_mtime = raw.stat().st_mtime_ns if raw.exists() else None
    tmp = raw.with_name(f".{image_id}.tmp")
    tmp.write_bytes(data)
    if old_mtime is not None:
        os.utime(tmp, ns=(old_mtime + 10**9, old_mtime + 10**9))
    os.replace(tmp, raw)


def thumbnail_size(layout: DataLayout, image_id: str) -> tuple[int, int]:
    with Image.open(layout.thumbnail_path(image_id)) as image:
        assert image.format == "WEBP"
        return image.size


def test_a_thumbnail_is_small_upright_webp(layout: DataLayout):
    # 800x400 stored, EXIF orientation 6 (rotate 90 degrees): upright it is 400x800.
    replace_raw(layout, "portrait", jpeg_bytes((800, 400), (200, 30, 30), orientation=6))
    outcome = make_thumbnail(layout, "portrait")
    assert (outcome.status, outcome.reason) == ("made", None)
    assert thumbnail_size(layout, "portrait") == (THUMBNAIL_MAX_SIDE // 2, THUMBNAIL_MAX_SIDE)
    assert thumbnail_is_current(layout, "portrait")
    assert not list(layout.thumbnails_dir.glob(".*.tmp"))


def test_a_small_image_is_not_enlarged(layout: DataLayout):
    replace_raw(layout, "tiny", jpeg_bytes((40, 30), (0, 90, 0)))
    assert make_thumbnail(layout, "tiny").status == "made"
    assert thumbnail_size(layout, "tiny") == (40, 30)


def test_a_thumbnail_is_made_once_and_reused(layout: DataLayout):
    replace_raw(layout, "a", jpeg_bytes((600, 400), (10, 20, 200)))
    assert make_thumbnail(layout, "a").status == "made"
    before = layout.thumbnail_path("a").stat()
    report = make_thumbnails(layout, ["a"])
    assert report.outcomes["a"].status == "current"
    after = layout.thumbnail_path("a").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_thumbnail_is_redone_when_the_raw_changes(layout: DataLayout):
    replace_raw(layout, "a", jpeg_bytes((600, 400), (10, 20, 200)))
    make_thumbnail(layout, "a")
    replace_raw(layout, "a", jpeg_bytes((400, 600), (250, 250, 0)))
    assert not thumbnail_is_current(layout, "a")
    assert make_thumbnails(layout, ["a"]).outcomes["a"].status == "made"
    assert thumbnail_size(layout, "a") == (171, 256)  # the new, portrait picture
    assert thumbnail_is_current(layout, "a")


def test_a_corrupt_raw_fails_alone_in_a_batch(layout: DataLayout):
    for k in range(5):
        replace_raw(layout, f"good{k}", jpeg_bytes((300, 200), (k * 40, 100, 100)))
    replace_raw(layout, "corrupt", jpeg_bytes((300, 200), (1, 2, 3))[:200])  # truncated JPEG
    replace_raw(layout, "not-an-image", b"hello, world\n" * 10)
    seen = []
    ids = ["good0", "corrupt", "good1", "missing", "not-an-image", "good2", "good3", "../escape", "good4"]
    report = make_thumbnails(layout, ids, workers=3, on_outcome=lambda outcome: seen.append(outcome.image_id))

    assert sorted(seen) == sorted(ids)
    assert sorted(report.ids("made")) == [f"good{k}" for k in range(5)]
    assert sorted(report.ids("failed")) == ["../escape", "corrupt", "missing", "not-an-image"]
    assert "cannot decode" in report.outcomes["corrupt"].reason
    assert "cannot decode" in report.outcomes["not-an-image"].reason
    assert report.outcomes["missing"].reason == "raw file missing"
    assert "not a safe id" in report.outcomes["../escape"].reason
    for image_id in ("corrupt", "missing", "not-an-image"):
        assert not layout.thumbnail_path(image_id).exists()
    assert report.summary_lines()[0].startswith("thumbnails: 5 made, 0 current, 4 failed")

    again = make_thumbnails(layout, ids)
    assert sorted(again.ids("current")) == [f"good{k}" for k in range(5)]
    assert sorted(again.ids("failed")) == ["../escape", "corrupt", "missing", "not-an-image"]


def test_a_raw_that_is_a_symlink_counts_as_missing(layout: DataLayout, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes((100, 100), (5, 5, 5)))
    layout.raw_path("linked").symlink_to(outside)
    assert make_thumbnail(layout, "linked").reason == "raw file missing"
    assert not thumbnail_is_current(layout, "linked")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_colour_modes_become_rgb_thumbnails(layout: DataLayout, mode: str):
    buffer = io.BytesIO()
    Image.new(mode, (120, 80)).save(buffer, "PNG")
    replace_raw(layout, "img", buffer.getvalue())
    assert make_thumbnail(layout, "img").status == "made"
    with Image.open(layout.thumbnail_path("img")) as image:
        assert image.mode == "RGB"
