"""Dataset JSONL records: reading and atomic writing with bounded backups, and the Stage 1 -> Stage 2 import.

Stage 1 (the original scripts' first format) kept the DINOv3 embedding inline in the JSONL and was keyed
by ``image_path``. Stage 2 keeps only metadata in the JSONL; every array lives in a per-image artefact.
The Stage-2 JSONL is always *derived* from those artefacts (see :mod:`.dataset`), so migrating means
moving the Stage-1 payload (embedding, caption) into artefacts, never editing the JSONL in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artefacts import (
    FORMAT_VERSION,
    Recipe,
    read_json,
    sha256_file,
    write_json_artefact,
    write_npy_artefact,
)
from .atomic import atomic_open
from .buckets import BUCKET_NAMES
from .layout import DataLayout, InvalidImageId, is_valid_image_id, validate_image_id
from .lock import data_lock

# Stage-2 fields in the order the dataset builder writes them: the seed's metadata, then provenance.
STAGE2_FIELDS = (
    "image_id",
    "image_path",
    "caption",
    "t5_attention_mask",
    "height",
    "width",
    "aspect_bucket",
    "format_version",
    "raw_sha256",
    "recipes",
    "t5_max_length",
    "npy_sha256",
)
DEFAULT_DINOV3_DIM = 1024
STAGE1_IMPORT = "stage1-import"
_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# Lines are read and written with surrogateescape so a line that is not valid UTF-8 survives a rewrite byte for byte.
_ENCODING_ERRORS = "surrogateescape"
_JSONL_ENCODER = json.JSONEncoder(ensure_ascii=False)  # built once: json.dumps builds one per call


# --- reading and writing --------------------------------------------------------------------


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield ``(line_no, object, raw_line)`` for every non-blank line; ``object`` is None when the line is
    malformed or not a JSON object, so callers can keep such lines verbatim instead of dropping them."""
    with open(path, encoding="utf-8", errors=_ENCODING_ERRORS, newline="\n") as handle:
        for line_no, line in enumerate(handle, start=1):
            raw = line.rstrip("\r\n")
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            yield line_no, value if isinstance(value, dict) else None, raw


def jsonl_text(record: Mapping[str, Any]) -> str:
    """A record as the text of one JSONL line (UTF-8 kept as is, no newline), as the writer writes it."""
    return _JSONL_ENCODER.encode(record)


def _jsonl_line(record: dict[str, Any] | str) -> bytes:
    text = record if isinstance(record, str) else jsonl_text(record)
    return (text + "\n").encode("utf-8", _ENCODING_ERRORS)


class _ContentUnchanged(Exception):
    """Raised inside :func:`atomic_open` to discard the temporary file: the destination already holds these bytes."""


def _same_content(path: Path, size: int, digest: str) -> bool:
    try:
        return os.path.getsize(path) == size and sha256_file(path) == digest
    except FileNotFoundError:
        return False


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any] | str], *, backups: int = 3) -> Path | None:
    """Replace ``path`` atomically with one JSON object per line (``ensure_ascii=False``).

    A ``str`` item is written verbatim: it is a line preserved as-is (e.g. a malformed one kept by prune).
    Before the old file is replaced it is kept as ``<stem>.<YYYYmmddTHHMMSSZ>.bak.jsonl`` beside it and only
    the newest ``backups`` backups survive. When the new content equals the old nothing is written and no
    backup is made (a no-op rebuild must not rotate the useful backups away). Returns the backup made, if any.
    """
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    try:
        with atomic_open(path, "wb") as handle:
            for record in records:
                line = _jsonl_line(record)
                handle.write(line)
                digest.update(line)
                size += len(line)
            if _same_content(path, size, digest.hexdigest()):
                raise _ContentUnchanged
            backup = _keep_backup(path) if backups > 0 and path.exists() else None
    except _ContentUnchanged:
        return None
    if backup is not None:
        _prune_backups(path, keep=backups)
    return backup


def _timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(_TIMESTAMP_FORMAT)


def _unique_sibling(path: Path, middle: str, suffix: str) -> Path:
    """``<stem>.[<middle>.]<timestamp>[-n]<suffix>`` next to ``path``, with ``n`` above any already used in
    this second (not the first free one: a deleted older backup must not make a new one sort as oldest)."""
    base = f"{path.stem}.{middle}.{_timestamp()}" if middle else f"{path.stem}.{_timestamp()}"
    pattern = re.compile(rf"{re.escape(base)}(?:-(\d+))?{re.escape(suffix)}")
    used = [int(m.group(1) or 0) for m in map(pattern.fullmatch, os.listdir(path.parent)) if m]
    return path.with_name(f"{base}-{max(used) + 1}{suffix}" if used else f"{base}{suffix}")


def _preserve(source: Path, destination: Path) -> None:
    """Keep ``source``'s current bytes under ``destination``. A hard link is free and exact because every
    writer replaces files by rename, never in place; filesystems without links get a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _keep_backup(path: Path) -> Path:
    backup = _unique_sibling(path, "", ".bak.jsonl")
    _preserve(path, backup)
    return backup


def backup_paths(path: Path) -> list[Path]:
    """Backups made by :func:`write_jsonl_atomic` for ``path``, oldest first."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.(\d{{8}}T\d{{6}}Z)(?:-(\d+))?\.bak\.jsonl")
    found: list[tuple[str, int, Path]] = []
    if path.parent.is_dir():
        for entry in os.scandir(path.parent):
            match = pattern.fullmatch(entry.name)
            if match:
                found.append((match.group(1), int(match.group(2) or 0), Path(entry.path)))
    return [item[2] for item in sorted(found)]


def _prune_backups(path: Path, keep: int) -> None:
    for old in backup_paths(path)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)


# --- record semantics shared by the builder, verification, shards and prune -----------------------


def record_image_id(record: Mapping[str, Any]) -> str | None:
    """The record's identity: ``image_id``, else the stem of ``image_path`` (unvalidated; Stage 1 had no id)."""
    image_id = record.get("image_id")
    if isinstance(image_id, str) and image_id:
        return image_id
    image_path = record.get("image_path")
    if isinstance(image_path, str) and image_path:
        return Path(image_path).stem
    return None


def is_stage1(record: Mapping[str, Any]) -> bool:
    """A record the original scripts wrote: Stage 1 (inline embedding, no format_version 2), or their
    Stage 2 (no ``recipes`` provenance, which every photoset record carries). Its captions are the
    expensive part and must be imported before the builder replaces the file."""
    return "dinov3_embedding" in record or record.get("format_version") != FORMAT_VERSION or "recipes" not in record


def holds_stage1_records(path: Path) -> bool:
    """True if the JSONL at ``path`` contains at least one record of the original scripts (migrate first)."""
    if not path.is_file():
        return False
    return any(record is not None and is_stage1(record) for _, record, _ in iter_jsonl(path))


def is_attention_mask(value: object) -> bool:
    """A non-empty list of 0/1 ints (JSON true/false are not mask values)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and set(map(type, value)) == {int}  # C-level checks: this runs for every image of a 60k build
        and value.count(0) + value.count(1) == len(value)
    )


def stage2_record_problems(record: Mapping[str, Any]) -> list[str]:
    """What makes ``record`` unusable as a training sample, judged from the record alone."""
    problems = []
    missing = [name for name in STAGE2_FIELDS if name not in record]
    if missing:
        problems.append(f"missing fields {', '.join(missing)}")
    if record.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {record.get('format_version')!r} != {FORMAT_VERSION}")
    caption = record.get("caption")
    if "caption" in record and not (isinstance(caption, str) and caption.strip()):
        problems.append("caption empty")
    if "t5_attention_mask" in record and not is_attention_mask(record["t5_attention_mask"]):
        problems.append("t5_attention_mask is not a list of 0/1")
    if "aspect_bucket" in record and record["aspect_bucket"] not in BUCKET_NAMES:
        problems.append(f"bucket invalid ({record['aspect_bucket']!r})")
    return problems


# --- Stage 1 -> Stage 2 migration -----------------------------------------------------------------


@dataclass
class MigrationReport:
    migrated: list[str] = field(default_factory=list)
    already_stage2: int = 0
    # image id (or "line N" for a line without a valid, unique id) -> why it was not (fully) imported
    failed: dict[str, str] = field(default_factory=dict)
    backup: Path | None = None
    remaining: Path | None = None
    dry_run: bool = False

    def summary_lines(self, max_failures: int = 50) -> list[str]:
        verb = "would migrate" if self.dry_run else "migrated"
        lines = [
            f"stage1 migration: {verb} {len(self.migrated)}, already stage 2: {self.already_stage2}, "
            f"failed: {len(self.failed)}"
        ]
        if self.backup:
            lines.append(f"  original kept as {self.backup}")
        if self.remaining:
            lines.append(f"  records not imported kept verbatim in {self.remaining}")
        for key, reason in list(self.failed.items())[:max_failures]:
            lines.append(f"  failed {key}: {reason}")
        if len(self.failed) > max_failures:
            lines.append(f"  ... and {len(self.failed) - max_failures} more")
        return lines


class _ImportError(ValueError):
    """A Stage-1 record whose payload cannot be imported; the message is the reason."""


def _stage1_embedding(layout: DataLayout, record: Mapping[str, Any], image_id: str, dims: int) -> np.ndarray:
    """The inline embedding (Stage 1) or, for the original's Stage 2, its ``dinov3/<id>.npy`` (no sidecar)."""
    values = record.get("dinov3_embedding")
    if values is None and "dinov3_embedding" not in record:
        try:
            stored = np.load(layout.npy_path("dinov3", image_id), allow_pickle=False)
        except (OSError, ValueError) as error:
            raise _ImportError(f"no inline dinov3_embedding and no readable dinov3/{image_id}.npy ({error})") from None
        if stored.shape != (dims,) or not np.all(np.isfinite(stored)):
            raise _ImportError(f"dinov3/{image_id}.npy has shape {stored.shape} or non-finite values")
        return stored.astype(np.float32)
    if not isinstance(values, list):
        raise _ImportError("no inline dinov3_embedding list")
    if len(values) != dims:
        raise _ImportError(f"dinov3_embedding has {len(values)} values, expected {dims}")
    if not all(type(v) in (int, float) and math.isfinite(v) for v in values):
        raise _ImportError("dinov3_embedding has non-numeric or non-finite values")
    return np.asarray(values, dtype=np.float32)


def _raw_inputs(layout: DataLayout, image_id: str) -> dict[str, str]:
    """``{"raw_sha256": ...}`` of the raw file as it is now (the facts' hash when they still describe it), or {}."""
    from .validity import raw_identity  # validity reads records' mask rule: imported here, not at the top

    raw_sha256, _ = raw_identity(layout, image_id, read_json(layout.json_path("facts", image_id)))
    return {"raw_sha256": raw_sha256} if raw_sha256 else {}


def _is_current(layout: DataLayout, kind: str, image_id: str, recipe: Recipe, inputs: Mapping[str, str]) -> bool:
    from .validity import judge_caption, judge_npy

    if kind == "captions":
        return judge_caption(layout, image_id, recipe, inputs).valid
    return judge_npy(layout, kind, image_id, recipe, inputs).valid


def _import_record(
    layout: DataLayout,
    record: Mapping[str, Any],
    *,
    dinov3_recipe: Recipe,
    caption_recipe: Recipe,
    dims: int,
    dry_run: bool,
) -> tuple[str, str | None]:
    """Import what is usable of one Stage-1 record: the embedding and the caption independently (a broken
    embedding must not cost the caption, the expensive part). Returns (image_id, why the import is
    incomplete, or None). Raises _ImportError when the record has no valid identity."""
    try:
        image_id = validate_image_id(record_image_id(record))
    except InvalidImageId as error:
        raise _ImportError(f"invalid image id: {error}") from None
    problems = []
    try:
        embedding: np.ndarray | None = _stage1_embedding(layout, record, image_id, dims)
    except _ImportError as error:
        embedding = None
        problems.append(str(error))
    caption = record.get("caption")
    inputs = _raw_inputs(layout, image_id)
    if not inputs:
        # Without the raw file the artefacts carry no raw hash: they are kept but never current, so they
        # are recomputed once the raw arrives; the record therefore also stays in the remaining file.
        problems.append("raw file missing (imported without raw_sha256)")
    if not dry_run:
        if embedding is not None and not _is_current(layout, "dinov3", image_id, dinov3_recipe, inputs):
            write_npy_artefact(
                layout, "dinov3", image_id, embedding, dinov3_recipe, inputs,
                extra={"origin": STAGE1_IMPORT, "patches": False},
            )
        has_caption = isinstance(caption, str) and caption.strip()
        if has_caption and not _is_current(layout, "captions", image_id, caption_recipe, inputs):
            body = {"caption": caption, "backend": STAGE1_IMPORT}
            write_json_artefact(layout, "captions", image_id, body, caption_recipe, inputs)
    return image_id, "; ".join(problems) or None


def migrate_stage1(
    layout: DataLayout,
    *,
    dinov3_recipe: Recipe,
    caption_recipe: Recipe,
    dry_run: bool = False,
    embedding_dim: int = DEFAULT_DINOV3_DIM,
) -> MigrationReport:
    """Move the payload of Stage-1 records in ``layout.dataset_jsonl`` into per-image artefacts.

    Per Stage-1 record (identity: ``image_id`` or the stem of ``image_path``): the inline DINOv3 embedding
    becomes ``dinov3/<id>.npy`` and a non-empty caption becomes ``captions/<id>.json``, both labelled with the
    configured recipes and origin ``stage1-import``. Artefacts that are already current are never overwritten.

    This does NOT write the Stage-2 JSONL: the dataset builder derives it from the artefacts. Lossless by
    construction: the original file is preserved first as ``<stem>.stage1.<timestamp>.jsonl``; every record
    that could not be fully imported (and every malformed line) is kept verbatim in
    ``<stem>.stage1-remaining.jsonl`` and listed in ``failed``. On success the Stage-1 file is then removed
    from ``dataset_jsonl`` (it lives on in the preserved copy), so it is not detected as Stage 1 again and
    the builder writes a fresh Stage-2 file. Stage-2 lines in a mixed file are derived data and are
    regenerated by the builder. A crash before that point leaves the file in place, and a rerun resumes
    (current artefacts are skipped). ``dry_run`` validates every record and writes nothing.
    """
    report = MigrationReport(dry_run=dry_run)
    source = layout.dataset_jsonl
    if not holds_stage1_records(source):
        return report
    with data_lock(layout.lock_path, exclusive=False):
        if not dry_run:
            report.backup = _unique_sibling(source, "stage1", ".jsonl")
            _preserve(source, report.backup)
        remaining_lines: list[int] = []
        seen: set[str] = set()
        for line_no, record, raw in iter_jsonl(source):
            if record is not None and not is_stage1(record):
                report.already_stage2 += 1
                continue
            candidate = record_image_id(record) if record is not None else None
            unique = is_valid_image_id(candidate) and candidate not in seen and candidate not in report.failed
            key = candidate if unique else f"line {line_no}"
            try:
                if record is None:
                    raise _ImportError("malformed line (not a JSON object)")
                if candidate in seen:
                    raise _ImportError("duplicate image id (the first record was imported)")
                image_id, incomplete = _import_record(
                    layout, record, dinov3_recipe=dinov3_recipe, caption_recipe=caption_recipe,
                    dims=embedding_dim, dry_run=dry_run,
                )
            except _ImportError as error:
                report.failed[key] = str(error)
                remaining_lines.append(line_no)
                continue
            seen.add(image_id)
            if incomplete:
                report.failed[image_id] = incomplete
                remaining_lines.append(line_no)
            else:
                report.migrated.append(image_id)
        if not dry_run:
            if remaining_lines:
                report.remaining = source.with_name(f"{source.stem}.stage1-remaining.jsonl")
                _keep_remaining(report.backup, set(remaining_lines), report.remaining)
            os.unlink(source)
    return report


def _keep_remaining(original: Path, line_numbers: set[int], path: Path) -> None:
    """Append the given lines of ``original`` verbatim to ``path`` (atomically; lines an earlier migration
    left there are kept). Read back from the preserved copy so failed records never pile up in memory."""
    with atomic_open(path, "wb") as handle:
        if path.exists():
            with open(path, "rb") as previous:
                shutil.copyfileobj(previous, handle)
        for line_no, _, raw in iter_jsonl(original):
            if line_no in line_numbers:
                handle.write(_jsonl_line(raw))
