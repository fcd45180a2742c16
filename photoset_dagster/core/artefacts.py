"""Per-image artefacts and their provenance.

Every derived artefact carries a JSON record: ``facts/<id>.json`` and ``captions/<id>.json`` are
themselves the artefact; each ``.npy`` has a sidecar ``<kind>/<id>.json``. The sidecar is written
*after* its ``.npy`` and acts as the commit marker: an ``.npy`` without a sidecar is incomplete.

A record holds the ``recipe`` (model id, revision, settings) and the ``inputs`` it was computed
from (raw file hash, caption hash). An artefact is *current* when its recipe hash equals the
configured one and its inputs equal the current inputs; anything else is *stale* and the
catch-up job recomputes exactly those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json, save_npy_atomic
from .layout import NPY_KINDS, DataLayout

FORMAT_VERSION = 2


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (canonical form)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Recipe:
    """What produces an artefact: model identity plus every setting that changes its bytes."""

    kind: str
    settings: Mapping[str, Any]

    @property
    def hash(self) -> str:
        return fingerprint({"kind": self.kind, **self.settings})

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.settings}


def write_npy_artefact(
    layout: DataLayout,
    kind: str,
    image_id: str,
    array: np.ndarray,
    recipe: Recipe,
    inputs: Mapping[str, str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<kind>/<id>.npy`` then its sidecar, both atomically; returns the sidecar record."""
    if kind not in NPY_KINDS:
        raise ValueError(f"{kind!r} is not an npy artefact kind")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{kind} for {image_id} has non-finite values; not stored")
    save_npy_atomic(layout.npy_path(kind, image_id), array)
    record = {
        "image_id": image_id,
        "kind": kind,
        "recipe": recipe.as_dict(),
        "recipe_hash": recipe.hash,
        "inputs": dict(inputs),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "created_at": now_iso(),
        **(extra or {}),
    }
    atomic_write_json(layout.json_path(kind, image_id), record)
    return record


def write_json_artefact(
    layout: DataLayout,
    kind: str,
    image_id: str,
    body: Mapping[str, Any],
    recipe: Recipe | None,
    inputs: Mapping[str, str],
) -> dict[str, Any]:
    """Write a JSON artefact (facts, captions) atomically; returns the record."""
    record = {"image_id": image_id, "kind": kind, **body, "inputs": dict(inputs), "created_at": now_iso()}
    if recipe is not None:
        record["recipe"] = recipe.as_dict()
        record["recipe_hash"] = recipe.hash
    atomic_write_json(layout.json_path(kind, image_id), record)
    return record


def staleness(record: Mapping[str, Any] | None, recipe_hash: str | None, inputs: Mapping[str, str]) -> str | None:
    """Why an artefact record is not current (``None`` when it is)."""
    if record is None:
        return "missing"
    if recipe_hash is not None and record.get("recipe_hash") != recipe_hash:
        return f"recipe changed ({record.get('recipe_hash')} -> {recipe_hash})"
    recorded = record.get("inputs") or {}
    for name, value in inputs.items():
        if recorded.get(name) != value:
            return f"input {name} changed"
    return None


def npy_staleness(
    layout: DataLayout, kind: str, image_id: str, recipe_hash: str, inputs: Mapping[str, str]
) -> str | None:
    """Like :func:`staleness` for an npy artefact, also requiring the ``.npy`` file itself."""
    reason = staleness(read_json(layout.json_path(kind, image_id)), recipe_hash, inputs)
    if reason is None and not os.path.isfile(layout.npy_path(kind, image_id)):
        return "npy file missing"
    return reason
