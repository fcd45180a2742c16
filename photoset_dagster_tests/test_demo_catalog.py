"""The demo catalog: deterministic, every bucket and type, the awkward encodings, and how it is served."""

from __future__ import annotations

import io
import re

import httpx
from PIL import Image, ImageOps

from photoset_dagster.core.buckets import BUCKET_NAMES, assign_bucket
from photoset_dagster.core.filetypes import SUPPORTED_TYPES
from photoset_dagster.core.layout import is_valid_image_id
from photoset_dagster.demo.catalog import demo_bad_items, demo_id, demo_photos, load_demo


def decode(body: bytes) -> Image.Image:
    return Image.open(io.BytesIO(body))


def test_demo_photos_are_the_same_bytes_every_call():
    first, second = demo_photos(), demo_photos()

    assert first == second
    assert len(first) >= 24


def test_ids_look_like_the_real_ones_and_are_unique():
    ids = [photo.image_id for photo in demo_photos()]

    assert all(re.fullmatch(r"[0-9a-z]{28}", image_id) and is_valid_image_id(image_id) for image_id in ids)
    assert len(set(ids)) == len(ids)
    assert demo_id("x") == demo_id("x") != demo_id("y")


def test_every_bucket_and_every_supported_type_is_covered():
    photos = demo_photos()

    assert {photo.expected_bucket for photo in photos} == set(BUCKET_NAMES)
    assert {photo.expected_ext for photo in photos} == set(SUPPORTED_TYPES)


def test_declared_size_and_bucket_match_the_decoded_image_after_exif():
    for photo in demo_photos():
        image = decode(photo.body)
        displayed = ImageOps.exif_transpose(image)
        assert displayed.size == photo.expected_size, photo.note
        assert assign_bucket(*displayed.size) == photo.expected_bucket, photo.note
        assert max(image.size) <= 256, photo.note


def test_the_awkward_encodings_are_all_there():
    photos = demo_photos()
    images = [(photo, decode(photo.body)) for photo in photos]

    def some(predicate) -> bool:
        return any(predicate(photo, image) for photo, image in images)

    assert some(lambda p, im: im.getexif().get(0x0112) == 6 and assign_bucket(*im.size) != p.expected_bucket)
    assert some(lambda p, im: p.expected_ext == "jpg" and im.mode == "CMYK")
    assert some(lambda p, im: p.expected_ext == "jpg" and im.mode == "L")
    assert some(lambda p, im: p.expected_ext == "png" and im.mode == "RGBA")
    assert some(lambda p, im: p.expected_ext == "png" and im.mode == "I;16")
    assert some(lambda p, im: p.expected_ext == "gif" and getattr(im, "n_frames", 1) > 1)
    assert some(lambda p, im: p.expected_ext == "webp" and getattr(im, "n_frames", 1) > 1)


def test_load_demo_serves_good_and_bad_items_across_pages(photo_server):
    photos = load_demo(photo_server, page_size=5)
    bad_count = len(demo_bad_items(photo_server))

    with httpx.Client() as client:
        pages = []
        page = 1
        while body := client.get(f"{photo_server.photos_url}?page={page}").json():
            pages.append(body)
            page += 1
        served = client.get(photo_server.file_url(photos[3].image_id)).content

    items = [entry for page in pages for entry in page]
    assert all(len(page) <= 5 for page in pages)
    assert len(items) == len(photos) + bad_count
    good_ids = {photo.image_id for photo in photos}
    good = [entry for entry in items if isinstance(entry, dict) and entry.get("filename") in good_ids]
    assert [entry["filename"] for entry in good] == [photo.image_id for photo in photos]
    assert good[0]["exportable_url"] == photo_server.file_url(photos[0].image_id)
    bad_positions = [index for index, entry in enumerate(items) if entry not in good]
    assert len(bad_positions) == bad_count
    assert min(bad_positions) < len(items) // 4  # spread through the list, not all appended
    assert served == photos[3].body
