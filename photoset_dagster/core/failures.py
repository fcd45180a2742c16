"""The failure ledger: the last failure of each image at each stage, and why.

``state/failures/<stage>/<id>.json`` is written when an image fails a stage (or is skipped because an
earlier stage failed for it) and removed when the image later completes that stage. One small file
per failure, written atomically, so concurrent runs never lose each other's entries and a crash
leaves the ledger consistent. Readers: ``verify`` (an image that *cannot be processed* versus one
*not done yet*), the photo-list sensor (ids already attempted), the dataset report and the CLI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from .artefacts import now_iso, read_json
from .atomic import atomic_write_json
from .layout import DataLayout, is_valid_image_id


@dataclass(frozen=True)
class Failure:
    image_id: str
    stage: str
    reason: str
    upstream: bool = False  # skipped because an earlier stage failed for this image
    run_id: str | None = None
    at: str = ""  # ISO 8601, UTC


def record_failure(layout: DataLayout, failure: Failure) -> None:
    entry = failure if failure.at else Failure(**{**asdict(failure), "at": now_iso()})
    # No fsync: the ledger is advisory and rebuilt by the next run; a lost entry costs nothing.
    atomic_write_json(layout.failure_path(failure.stage, failure.image_id), asdict(entry), fsync=False)


def clear_failure(layout: DataLayout, stage: str, image_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.failure_path(stage, image_id))


def forget_image(layout: DataLayout, image_id: str) -> None:
    """Drop every entry of ``image_id`` (prune: the image left the list)."""
    try:
        stages = os.listdir(layout.failures_dir)
    except FileNotFoundError:
        return
    for stage in stages:
        clear_failure(layout, stage, image_id)


def read_failure(layout: DataLayout, stage: str, image_id: str) -> Failure | None:
    """The recorded failure of ``image_id`` at ``stage``, if any."""
    record = read_json(layout.failure_path(stage, image_id))
    try:
        return Failure(**record) if record is not None else None
    except TypeError:  # an entry from another version
        return None


def iter_failures(layout: DataLayout, stages: Iterable[str] | None = None) -> Iterator[Failure]:
    """Every recorded failure (of ``stages``, or of all), in no particular order."""
    root = layout.failures_dir
    try:
        stage_names = list(stages) if stages is not None else sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for stage in stage_names:
        try:
            entries = list(os.scandir(root / stage))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            stem, _, suffix = entry.name.rpartition(".")
            if suffix != "json" or not is_valid_image_id(stem):
                continue
            failure = read_failure(layout, stage, stem)
            if failure is not None:
                yield failure


def failed_ids(layout: DataLayout, stage: str) -> set[str]:
    """Ids with a recorded failure at ``stage`` (one directory listing, no file reads)."""
    try:
        names = os.listdir(layout.failures_dir / stage)
    except FileNotFoundError:
        return set()
    return {name[:-5] for name in names if name.endswith(".json") and is_valid_image_id(name[:-5])}
