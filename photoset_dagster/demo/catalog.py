"""Deterministic demo content: small generated photos of every shape and format, plus bad list items.

The photos cover all seven aspect buckets and every type ``core.filetypes`` supports, including the
awkward cases downstream decoding must handle (EXIF rotation, CMYK, greyscale, 16-bit, alpha,
palette, animation). Same bytes on every call, so tests can pin expectations to them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..core.buckets import BUCKETS, assign_bucket
from ..core.filetypes import AVIF_SUPPORTED

if TYPE_CHECKING:  # the server's demo entry point imports this module
    from .server import PhotoServer


@dataclass(frozen=True)
class DemoPhoto:
    image_id: str
    body: bytes
    expected_ext: str
    note: str
    expected_size: tuple[int, int] | None = None  # (width, height) as displayed, i.e. after EXIF orientation
    expected_bucket: str | None = None  # assign_bucket(*expected_size)
    duplicate_of: str | None = None  # a planted duplicate: the id of the photo it copies


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ID_LENGTH = 28  # like the real ids, e.g. o2jdtq9uz05whadn9jc8y4mz46xg


def demo_id(label: str) -> str:
    """A 28-char lowercase alphanumeric id derived from ``label`` (stable across runs)."""
    number = int.from_bytes(hashlib.sha256(f"photoset-demo:{label}".encode()).digest(), "big")
    digits = []
    while len(digits) < _ID_LENGTH:
        number, digit = divmod(number, len(_ID_ALPHABET))
        digits.append(_ID_ALPHABET[digit])
    return "".join(digits)


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """An RGB test card: two gradients plus a few seeded blocks, so crops and rotations are visible."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1), np.full_like(xs, (seed * 37) % 256)], axis=-1
    ).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        pixels[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _frames(picture: Image.Image, count: int = 3) -> list[Image.Image]:
    """Animation frames: the picture shifted a little further each frame."""
    array = np.asarray(picture)
    return [Image.fromarray(np.roll(array, shift=8 * n, axis=1), "RGB") for n in range(count)]


def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    return _save(image, "JPEG", quality=85)


def _png(image: Image.Image) -> bytes:
    return _save(image, "PNG")


def _webp(image: Image.Image) -> bytes:
    return _save(image, "WEBP", quality=80)


def _save_animated(picture: Image.Image, fmt: str, **params: Any) -> bytes:
    first, *rest = _frames(picture)
    return _save(first, fmt, save_all=True, append_images=rest, duration=120, loop=0, **params)


def _exif_rotated_jpeg(picture: Image.Image) -> bytes:
    """Stored sideways with orientation 6 ("rotate 90° clockwise to display"): displays as ``picture``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(picture.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=85, exif=exif.tobytes())


def _grey16_png(picture: Image.Image) -> bytes:
    grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return _png(Image.fromarray(grey))  # uint16 -> mode "I;16"


def _with_alpha(picture: Image.Image) -> Image.Image:
    rgba = picture.convert("RGBA")
    alpha = np.asarray(picture.convert("L")) // 2 + 64  # a gradient: partly transparent everywhere
    rgba.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    return rgba


# (note, extension, encoder from the displayed RGB picture to file bytes).
_Spec = tuple[str, str, Callable[[Image.Image], bytes]]
_PLAIN: list[_Spec] = [("jpeg, RGB", "jpg", _jpeg), ("png, RGB", "png", _png), ("webp, still", "webp", _webp)]
# One photo each; plain ones then fill every bucket a few times over.
_SPECIAL: list[_Spec] = [
    *_PLAIN,
    ("jpeg, EXIF orientation 6: stored sideways", "jpg", _exif_rotated_jpeg),
    ("jpeg, CMYK", "jpg", lambda p: _jpeg(p.convert("CMYK"))),
    ("jpeg, greyscale", "jpg", lambda p: _jpeg(p.convert("L"))),
    ("png, RGBA with transparency", "png", lambda p: _png(_with_alpha(p))),
    ("png, 16-bit greyscale (I;16)", "png", _grey16_png),
    ("png, palette", "png", lambda p: _png(p.quantize(colors=32))),
    ("gif, still", "gif", lambda p: _save(p.quantize(colors=64), "GIF")),
    ("gif, animated (3 frames)", "gif", lambda p: _save_animated(p, "GIF")),
    ("webp, animated (3 frames)", "webp", lambda p: _save_animated(p, "WEBP", quality=80)),
    ("bmp, RGB", "bmp", lambda p: _save(p, "BMP")),
    ("tiff, RGB", "tiff", lambda p: _save(p, "TIFF")),
]
if AVIF_SUPPORTED:
    _SPECIAL.append(("avif, RGB", "avif", lambda p: _save(p, "AVIF", quality=60, speed=8)))
_DEMO_COUNT = 28  # four per bucket
_LONGEST_SIDES = (64, 96, 128, 160, 192, 256)


def _bucket_size(bucket_index: int, longest_side: int) -> tuple[int, int]:
    """A small (width, height) with the bucket's aspect ratio."""
    width, height = BUCKETS[bucket_index]
    scale = longest_side / max(width, height)
    return round(width * scale), round(height * scale)


def demo_photos() -> list[DemoPhoto]:
    """The good demo photos; specials first, each bucket visited in turn, then a planted near-duplicate
    (the first photo's picture re-encoded at another quality) and an exact copy (the second photo's
    bytes under another id), for the dataset report's duplicate clusters."""
    specs = [*_SPECIAL, *itertools.islice(itertools.cycle(_PLAIN), max(0, _DEMO_COUNT - len(_SPECIAL)))]
    photos = []
    for index, (note, ext, encode) in enumerate(specs):
        size = _bucket_size(index % len(BUCKETS), _LONGEST_SIDES[index % len(_LONGEST_SIDES)])
        body = encode(_picture(*size, seed=index))
        bucket = assign_bucket(*size)
        photos.append(DemoPhoto(demo_id(f"good-{index}"), body, ext, f"{note}, {size[0]}x{size[1]}", size, bucket))
    first, second = photos[0], photos[1]
    assert first.expected_size is not None
    reencoded = _save(_picture(*first.expected_size, seed=0), "JPEG", quality=60)
    photos.append(replace(first, image_id=demo_id("near-duplicate-of-good-0"), body=reencoded, expected_ext="jpg",
                          note="near-duplicate: the same picture as JPEG quality 60", duplicate_of=first.image_id))
    photos.append(replace(second, image_id=demo_id("exact-copy-of-good-1"),
                          note="exact copy: the same bytes under another id", duplicate_of=second.image_id))
    return photos


_UNSAFE_TARGET = "unsafe-target"  # a real image, so only filename validation keeps it off disk
# A real-looking id whose first letter is CYRILLIC SMALL LETTER O: looks ASCII, is not.
LOOKALIKE_ID = "\u043e" + demo_id("lookalike")[1:]


def demo_bad_items(server: PhotoServer) -> list[Any]:
    """List items that must be rejected or must fail, one per failure mode; registers their files on ``server``.

    Unsafe filenames point at a real image, so a client that skipped validation would write it.
    """
    server.set_file(_UNSAFE_TARGET, _save(_picture(32, 32, seed=999), "PNG"))
    unsafe_url = server.file_url(_UNSAFE_TARGET)
    html_id, missing_id, ftp_id = demo_id("bad-html"), demo_id("bad-404"), demo_id("bad-ftp")
    server.set_file(html_id, b"<!doctype html><html><body>Please log in</body></html>")
    unsafe_names = ["../escape", "a/b", ".hidden", "dot.name", "comma,id", LOOKALIKE_ID]
    return [
        *({"filename": name, "exportable_url": unsafe_url} for name in unsafe_names),
        ["not", "an", "object"],
        {"exportable_url": unsafe_url},
        {"filename": html_id, "exportable_url": server.file_url(html_id)},
        {"filename": missing_id, "exportable_url": server.file_url(missing_id)},
        {"filename": ftp_id, "exportable_url": "ftp://127.0.0.1/x"},
    ]


def load_demo(server: PhotoServer, page_size: int = 10, photos_limit: int | None = None) -> list[DemoPhoto]:
    """Serve the demo list (good and bad items interleaved, ``page_size`` per page) and its files;
    ``photos_limit`` serves only the first N good photos, with the duplicates planted of them (the bad
    items always).

    Returns the good photos served.
    """
    every = demo_photos()
    photos = every[:photos_limit]
    kept = {photo.image_id for photo in photos}
    # The planted duplicates come along with the photos they copy, so a small demo still shows clusters.
    photos += [photo for photo in every if photo.duplicate_of in kept and photo.image_id not in kept]
    good: list[Any] = []
    for number, photo in enumerate(photos, start=1):
        server.set_file(photo.image_id, photo.body)
        good.append({"id": number, "filename": photo.image_id, "exportable_url": server.file_url(photo.image_id)})
    bad = demo_bad_items(server)
    items = _interleave(good, bad)
    server.set_pages([items[start : start + page_size] for start in range(0, len(items), page_size)])
    return photos


def _interleave(good: list[Any], bad: list[Any]) -> list[Any]:
    """``good`` with ``bad`` spread evenly through it, both in order."""
    every = max(1, len(good) // max(1, len(bad)))
    pending = iter(bad)
    merged: list[Any] = []
    for number, item in enumerate(good, start=1):
        merged.append(item)
        if number % every == 0:
            merged.extend(itertools.islice(pending, 1))
    merged.extend(pending)
    return merged
