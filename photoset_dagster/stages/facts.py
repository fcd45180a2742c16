"""The ``image_facts`` stage: decode each approved image once and record what every later stage needs —
its size after EXIF orientation, aspect bucket, format and colour profile, and the raw file's sha256
with the stat fingerprint that lets later readers trust that hash without re-reading the file.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..core.artefacts import read_json, sha256_file, write_json_artefact
from ..core.failures import read_failure
from ..core.images import read_facts
from ..core.layout import DataLayout
from ..core.links import scan_approved_links_for
from ..core.validity import raw_fingerprint, raw_identity
from .base import APPROVED_LINKS, IMAGE_FACTS, ImageFailure, Outcome, UpstreamFailed
from .runner import OrderedMap, check_cancel


def run_facts_stage(
    layout: DataLayout, image_ids: Iterable[str], *, force: bool = False, cancel: threading.Event | None = None
) -> Iterator[Outcome]:
    """One outcome per distinct id, in order; missing or outdated facts are computed in parallel."""
    unique_ids = list(dict.fromkeys(image_ids))
    with OrderedMap(lambda image_id: ensure_facts(layout, image_id, force), unique_ids) as results:
        for image_id, result in results:
            check_cancel(cancel)
            if isinstance(result, ImageFailure):
                status = "skipped" if isinstance(result, UpstreamFailed) else "failed"
                yield Outcome(IMAGE_FACTS, image_id, status, reason=str(result))
            else:
                record, computed = result
                yield Outcome(IMAGE_FACTS, image_id, "done" if computed else "current", record=record)


def ensure_facts(layout: DataLayout, image_id: str, force: bool = False) -> tuple[Mapping[str, Any], bool]:
    """(the image's facts record, whether it was computed now). Recomputed when forced, when the link's
    extension changed or when the raw file holds other bytes than the facts describe; a raw that was
    only touched or copied keeps its facts (re-anchored to the new stat)."""
    extensions = scan_approved_links_for(layout, image_id)
    if not extensions:
        sync_failure = read_failure(layout, APPROVED_LINKS, image_id)
        if sync_failure is not None:  # its true reason, not "not synced", in the ledger, the UI and the report
            raise UpstreamFailed(f"{APPROVED_LINKS} failed: {sync_failure.reason}")
        raise ImageFailure("not in the approved view (sync it first)")
    ext = extensions[0]
    raw = layout.raw_path(image_id)
    try:
        stat = os.stat(raw)
    except FileNotFoundError:
        raise ImageFailure(f"raw file missing: {raw}") from None
    record = None if force else read_json(layout.json_path("facts", image_id))
    raw_sha256 = None
    if record is not None and record.get("ext") == ext:
        raw_sha256, changed = raw_identity(layout, image_id, record)
        if changed is None and raw_sha256 is not None:
            if any(record.get(k) != v for k, v in raw_fingerprint(stat).items()):
                record = _write(layout, image_id, {**record, **raw_fingerprint(stat)}, raw_sha256)
            return record, False
    facts = read_facts(raw)
    body = {"ext": ext, **dataclasses.asdict(facts), **raw_fingerprint(stat)}
    return _write(layout, image_id, body, raw_sha256 or sha256_file(raw)), True


_BOOKKEEPING = ("image_id", "kind", "inputs", "created_at")


def _write(layout: DataLayout, image_id: str, body: Mapping[str, Any], raw_sha256: str) -> dict[str, Any]:
    fields = {name: value for name, value in body.items() if name not in _BOOKKEEPING}
    return write_json_artefact(layout, "facts", image_id, body=fields, recipe=None, inputs={"raw_sha256": raw_sha256})
