"""Magic-byte type detection: every supported type, near misses, and unreadable files."""

from __future__ import annotations

import pytest
from PIL import features

from photoset_dagster.core.filetypes import SUPPORTED_TYPES, detect_file_type, detect_type
from photoset_dagster.core.links import LINK_EXTENSIONS
from photoset_dagster.demo.catalog import demo_photos
from photoset_dagster_tests.fixtures_http import image_bytes


def test_every_demo_photo_is_detected_as_its_type():
    photos = demo_photos()

    for photo in photos:
        assert detect_type(photo.body[:32]) == photo.expected_ext, photo.note
    assert {photo.expected_ext for photo in photos} == set(SUPPORTED_TYPES)


def test_supported_types_are_link_extensions_and_avif_follows_pillow():
    assert set(SUPPORTED_TYPES) <= set(LINK_EXTENSIONS)
    assert ("avif" in SUPPORTED_TYPES) == bool(features.check("avif"))


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff")],
)
def test_pillow_encoded_files_are_recognised(fmt, expected):
    assert detect_type(image_bytes(fmt)[:32]) == expected


def test_big_endian_tiff_and_gif87a():
    assert detect_type(b"MM\x00*\x00\x00\x00\x08") == "tiff"
    assert detect_type(b"GIF87a\x01\x00\x01\x00") == "gif"


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(body) + 4).to_bytes(4, "big") + body


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_by_major_or_compatible_brand_but_not_heic():
    assert detect_type(ftyp(b"avif", b"mif1")) == "avif"
    assert detect_type(ftyp(b"mif1", b"miaf", b"avif")) == "avif"
    assert detect_type(ftyp(b"avis", b"msf1")) == "avif"
    assert detect_type(ftyp(b"mif1", b"heic")) is None
    assert detect_type(ftyp(b"heic", b"mif1")) is None
    assert detect_type(ftyp(b"isom", b"mp41")) is None  # an MP4 video


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\xff\xd8",  # a JPEG signature cut short
        b"<!doctype html><html><body>login</body></html>",
        b'{"error": "rate limited"}',
        b"BM is a text that starts with BM and nothing more",  # 'BM' without a DIB header
        b"GIF88a",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",  # a WAV file, not WEBP
        b"\x89PNG\r\n",
    ],
)
def test_non_images_and_near_misses_are_unknown(head):
    assert detect_type(head) is None


def test_detect_file_type_reads_the_head_of_a_file(tmp_path):
    path = tmp_path / "raw"
    path.write_bytes(image_bytes("WEBP"))
    assert detect_file_type(path) == "webp"
    path.write_bytes(b"plain text")
    assert detect_file_type(path) is None


def test_detect_file_type_raises_oserror_for_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_file_type(tmp_path / "absent")
    with pytest.raises(IsADirectoryError):
        detect_file_type(tmp_path)
