"""Thumbnails: one small upright WebP per image (``derived/thumbnails/<id>.webp``), the dataset report's pictures.

A thumbnail is made once and reused. Its file's mtime is set to the raw file's mtime when it is written,
so "is it current?" costs two ``stat`` calls and no extra files: a raw is only ever replaced by renaming a
freshly written file (see :mod:`.download`), which gives it a new mtime, so a changed raw never matches.
(Copying a data root without preserving mtimes therefore remakes every thumbnail: slow, never wrong.)
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from .atomic import atomic_open
from .images import ImageDecodeError, decode_image
from .layout import DataLayout, InvalidImageId, validate_image_id

THUMBNAIL_MAX_SIDE = 256  # longest side in pixels; changing it needs the old thumbnails deleted
_WEBP_QUALITY = 80
# Pillow releases the GIL while decoding, resizing and encoding; each worker holds one decoded photo
# (~70 MB at 24 MP), so the pool stays small even on big machines.
_DEFAULT_WORKERS = min(8, os.cpu_count() or 2)

ThumbnailStatus = Literal["made", "current", "failed"]


@dataclass(frozen=True)
class ThumbnailOutcome:
    image_id: str
    status: ThumbnailStatus
    reason: str | None = None  # why it failed


@dataclass
class ThumbnailReport:
    outcomes: dict[str, ThumbnailOutcome]  # image id -> outcome
    seconds: float

    def ids(self, status: ThumbnailStatus) -> list[str]:
        return [image_id for image_id, outcome in self.outcomes.items() if outcome.status == status]

    def summary_lines(self, max_failures: int = 20) -> list[str]:
        counts = Counter(outcome.status for outcome in self.outcomes.values())
        lines = [
            f"thumbnails: {counts['made']} made, {counts['current']} current, {counts['failed']} failed "
            f"in {self.seconds:.1f}s"
        ]
        failed = [outcome for outcome in self.outcomes.values() if outcome.status == "failed"]
        lines += [f"  failed {outcome.image_id}: {outcome.reason}" for outcome in failed[:max_failures]]
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more")
        return lines


def _raw_stat(layout: DataLayout, image_id: str) -> os.stat_result | None:
    """The raw file's stat, or None if it is missing or not a regular file (a symlink raw counts as
    missing, as it does for prune: it may point out of the data root)."""
    try:
        info = os.lstat(layout.raw_path(image_id))
    except OSError:  # missing, or a folder on the way is unreadable
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def _is_current(layout: DataLayout, image_id: str, raw: os.stat_result) -> bool:
    try:
        return os.stat(layout.thumbnail_path(image_id)).st_mtime_ns == raw.st_mtime_ns
    except OSError:
        return False


def thumbnail_is_current(layout: DataLayout, image_id: str) -> bool:
    """True if the image's thumbnail exists and was made from its present raw file."""
    raw = _raw_stat(layout, image_id)
    return raw is not None and _is_current(layout, image_id, raw)


def _webp_bytes(image: Image.Image) -> bytes:
    image.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=_WEBP_QUALITY)
    return buffer.getvalue()


def make_thumbnail(layout: DataLayout, image_id: str) -> ThumbnailOutcome:
    """Make the image's thumbnail unless it is current; never raises for a bad id, raw or write."""
    try:
        validate_image_id(image_id)
    except InvalidImageId as error:
        return ThumbnailOutcome(str(image_id), "failed", str(error))
    # The raw's mtime is read *before* decoding: if the raw is replaced meanwhile, the stamp is the old
    # mtime and the next run sees the thumbnail as stale.
    raw = _raw_stat(layout, image_id)
    if raw is None:
        return ThumbnailOutcome(image_id, "failed", "raw file missing")
    if _is_current(layout, image_id, raw):
        return ThumbnailOutcome(image_id, "current")
    try:
        data = _webp_bytes(decode_image(layout.raw_path(image_id)))
    except ImageDecodeError as error:
        return ThumbnailOutcome(image_id, "failed", str(error))
    try:
        with atomic_open(layout.thumbnail_path(image_id), "wb") as handle:
            handle.write(data)
            handle.flush()  # every byte written before the stamp: a later write would move the mtime
            os.utime(handle.fileno(), ns=(raw.st_atime_ns, raw.st_mtime_ns))
    except OSError as error:
        return ThumbnailOutcome(image_id, "failed", f"cannot write thumbnail: {error}")
    return ThumbnailOutcome(image_id, "made")


def make_thumbnails(
    layout: DataLayout,
    image_ids: Iterable[str],
    *,
    workers: int = _DEFAULT_WORKERS,
    on_outcome: Callable[[ThumbnailOutcome], None] | None = None,
) -> ThumbnailReport:
    """Make every missing or stale thumbnail of ``image_ids`` in a thread pool.

    Current thumbnails are recognised up front (two stats each) without touching the pool. Each image
    fails alone, with its reason; ``on_outcome`` is called (from this thread) once per image, e.g. to
    drive a progress meter.
    """
    started = time.monotonic()
    outcomes: dict[str, ThumbnailOutcome] = {}

    def settle(outcome: ThumbnailOutcome) -> None:
        outcomes[outcome.image_id] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    to_make = []
    for image_id in dict.fromkeys(image_ids):  # de-duplicated, order kept
        try:
            current = thumbnail_is_current(layout, image_id)
        except InvalidImageId:
            current = False  # make_thumbnail reports it
        if current:
            settle(ThumbnailOutcome(image_id, "current"))
        else:
            to_make.append(image_id)
    if to_make:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="thumbnail") as pool:
            for outcome in pool.map(lambda image_id: make_thumbnail(layout, image_id), to_make):
                settle(outcome)
    return ThumbnailReport(outcomes, time.monotonic() - started)
