"""The seed's 7 aspect buckets (~1 MP, multiples of 64) and the geometry that maps images onto them."""

from __future__ import annotations

import math

from PIL import Image

# (width, height), in the seed's order: ties go to the earlier bucket.
BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (832, 1216),
    (1216, 832),
    (768, 1280),
    (1280, 768),
    (704, 1344),
    (1344, 704),
)
BUCKET_NAMES: tuple[str, ...] = tuple(f"{w}x{h}" for w, h in BUCKETS)


def parse_bucket(name: str) -> tuple[int, int]:
    """``"832x1216"`` or ``"bucket_832x1216"`` -> (832, 1216); raises ValueError for anything else."""
    text = name.removeprefix("bucket_") if isinstance(name, str) else ""
    if text not in BUCKET_NAMES:
        raise ValueError(f"unknown aspect bucket {name!r}; expected one of {', '.join(BUCKET_NAMES)}")
    width, height = text.split("x")
    return int(width), int(height)


def assign_bucket(width: int, height: int) -> str:
    """Nearest bucket by linear W/H ratio (the seed's rule); ties go to the earlier bucket."""
    ratio = width / height if height > 0 else 1.0
    best = min(range(len(BUCKETS)), key=lambda i: (abs(BUCKETS[i][0] / BUCKETS[i][1] - ratio), i))
    return BUCKET_NAMES[best]


def cover_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers ``size`` (W, H), then centre-crop to exactly ``size`` (the seed's bucketed crop)."""
    target_w, target_h = size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, math.ceil(width * scale)), max(target_h, math.ceil(height * scale))
    if (new_w, new_h) != (width, height):
        # reducing_gap: a cheap box pre-shrink first, ~2x faster on multi-megapixel photos.
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def original_size(width: int, height: int, multiple: int = 16, max_pixels: int = 4 * 1024 * 1024) -> tuple[int, int]:
    """Size for 'original resolution' encoding: sides rounded to ``multiple``, area capped at ``max_pixels``."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    while w * h > max_pixels:
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h
