"""The data layout: the only place that knows folder names and what a valid image id is.

Everything under the data root::

    raw/<id>                         downloaded bytes, no extension
    approved/<id>.<ext>  -> ../raw/<id>
    state/photo_list.json            last listing snapshot (ids, urls, digest, completeness)
    state/failures/<stage>/<id>.json the last failure of an image at a stage, with its reason
    derived/facts/<id>.json          width/height after EXIF, bucket, raw sha256
    derived/captions/<id>.json       caption text + provenance
    derived/dinov3/<id>.npy (+ .json sidecar)
    derived/dinov3_patches/<id>.npy  (optional, written by the dinov3 pass)
    derived/vae_latents/<id>.npy (+ .json)
    derived/t5_hidden/<id>.npy (+ .json, holds the attention mask)
    derived/thumbnails/<id>.webp     a small preview per image (the dataset report's pictures)
    derived/approved_image_dataset.jsonl
    shards/bucket_WxH/shard-NNNNNN.tar (+ index.json)
    reports/dataset_report.html      the visual dataset report
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# ASCII letters, digits, '_' and '-'; must start with a letter or digit (no hidden files, no options).
# No dots (extensions, '..'), commas (Dagster backfills split on them) or slashes.
MAX_IMAGE_ID_LENGTH = 128
_IMAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class InvalidImageId(ValueError):
    """A remote filename that cannot be used as a path component and partition key."""


def validate_image_id(value: object) -> str:
    """Return ``value`` if it is a safe image id, else raise :class:`InvalidImageId` with the reason."""
    if not isinstance(value, str):
        raise InvalidImageId(f"filename is not a string ({type(value).__name__})")
    if not value:
        raise InvalidImageId("filename is empty")
    if len(value) > MAX_IMAGE_ID_LENGTH:
        raise InvalidImageId(f"filename is longer than {MAX_IMAGE_ID_LENGTH} characters")
    if not _IMAGE_ID_RE.fullmatch(value):
        raise InvalidImageId(
            f"filename {value!r} is not a safe id (ASCII letters, digits, '_' and '-', "
            "starting with a letter or digit)"
        )
    return value


def is_valid_image_id(value: object) -> bool:
    try:
        validate_image_id(value)
    except InvalidImageId:
        return False
    return True


# Per-image derived artefacts: kind -> folder under derived/. Order is pipeline order.
NPY_KINDS = ("dinov3", "vae_latents", "t5_hidden")
JSON_KINDS = ("facts", "captions")
PATCHES_DIR = "dinov3_patches"
THUMBNAILS_DIR = "thumbnails"
DATASET_JSONL_NAME = "approved_image_dataset.jsonl"


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    # --- folders -------------------------------------------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def approved_dir(self) -> Path:
        return self.root / "approved"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def derived_dir(self) -> Path:
        return self.root / "derived"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def failures_dir(self) -> Path:
        return self.state_dir / "failures"

    @property
    def thumbnails_dir(self) -> Path:
        return self.derived_dir / THUMBNAILS_DIR

    def kind_dir(self, kind: str) -> Path:
        if kind not in NPY_KINDS and kind not in JSON_KINDS and kind != PATCHES_DIR:
            raise ValueError(f"unknown artefact kind {kind!r}")
        return self.derived_dir / kind

    @property
    def patches_dir(self) -> Path:
        return self.derived_dir / PATCHES_DIR

    def bucket_shard_dir(self, bucket: str) -> Path:
        return self.shards_dir / f"bucket_{bucket}"

    # --- files ---------------------------------------------------------------------------
    @property
    def photo_list_path(self) -> Path:
        return self.state_dir / "photo_list.json"

    @property
    def dataset_jsonl(self) -> Path:
        return self.derived_dir / DATASET_JSONL_NAME

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "data.lock"

    def raw_path(self, image_id: str) -> Path:
        return self.raw_dir / validate_image_id(image_id)

    def approved_link(self, image_id: str, ext: str) -> Path:
        return self.approved_dir / f"{validate_image_id(image_id)}.{ext}"

    def link_target(self, image_id: str) -> str:
        """Relative symlink target from approved/ to raw/ (``../raw/<id>``)."""
        return os.path.join("..", "raw", validate_image_id(image_id))

    def image_path_field(self, image_id: str, ext: str) -> str:
        """The JSONL ``image_path``: the approved link, relative to the data root's parent."""
        return f"{self.root.name}/approved/{validate_image_id(image_id)}.{ext}"

    def json_path(self, kind: str, image_id: str) -> Path:
        """facts/captions record, or the provenance sidecar of an npy artefact."""
        return self.kind_dir(kind) / f"{validate_image_id(image_id)}.json"

    def thumbnail_path(self, image_id: str) -> Path:
        return self.thumbnails_dir / f"{validate_image_id(image_id)}.webp"

    def failure_path(self, stage: str, image_id: str) -> Path:
        return self.failures_dir / stage / f"{validate_image_id(image_id)}.json"

    def npy_path(self, kind: str, image_id: str) -> Path:
        if kind not in NPY_KINDS and kind != PATCHES_DIR:
            raise ValueError(f"{kind!r} has no .npy artefact")
        return self.kind_dir(kind) / f"{validate_image_id(image_id)}.npy"

    def derived_paths(self, image_id: str) -> list[Path]:
        """Every file the pipeline may derive for one image (what prune removes)."""
        paths = [self.json_path(kind, image_id) for kind in JSON_KINDS]
        for kind in NPY_KINDS:
            paths += [self.npy_path(kind, image_id), self.json_path(kind, image_id)]
        paths += [self.npy_path(PATCHES_DIR, image_id), self.thumbnail_path(image_id)]
        return paths

    def ensure_dirs(self) -> None:
        for d in (self.raw_dir, self.approved_dir, self.state_dir, self.shards_dir):
            d.mkdir(parents=True, exist_ok=True)
        for kind in (*JSON_KINDS, *NPY_KINDS, PATCHES_DIR):
            self.kind_dir(kind).mkdir(parents=True, exist_ok=True)

    def contains(self, path: Path) -> bool:
        """True if ``path`` (resolved, links followed) lies inside the data root."""
        try:
            Path(os.path.realpath(path)).relative_to(os.path.realpath(self.root))
        except ValueError:
            return False
        return True
