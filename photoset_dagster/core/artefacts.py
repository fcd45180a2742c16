"""Per-image artefacts and their provenance.

Every derived artefact carries a JSON record: ``facts/<id>.json`` and ``captions/<id>.json`` are
themselves the artefact; each ``.npy`` has a sidecar ``<kind>/<id>.json``. The sidecar is written
*after* its ``.npy`` and acts as the commit marker: an ``.npy`` without a sidecar is incomplete.

A record holds the ``recipe`` (model id, revision, settings) and the ``inputs`` it was computed
from (raw file hash, caption hash); a sidecar also holds the *proof* of its ``.npy`` (size, mtime
and sha256 of the file as written), so a file truncated, edited or swapped after the sidecar was
written is caught (``core.validity``). An artefact is *current* when its recipe equals the
configured one and its inputs equal the current inputs; anything else is *stale*.
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

from .atomic import atomic_write_bytes, atomic_write_json, npy_bytes
from .layout import NPY_KINDS, DataLayout

FORMAT_VERSION = 2


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (canonical form)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_proof(path: Path, sha256: str) -> dict[str, Any]:
    """What a sidecar records about its ``.npy`` as written: a cheap stat key plus the content hash."""
    stat = os.stat(path)
    return {"npy_size": stat.st_size, "npy_mtime_ns": stat.st_mtime_ns, "npy_sha256": sha256}


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
    data = npy_bytes(array)
    npy = layout.npy_path(kind, image_id)
    atomic_write_bytes(npy, data)
    record = {
        "image_id": image_id,
        "kind": kind,
        "recipe": recipe.as_dict(),
        "recipe_hash": recipe.hash,
        "inputs": dict(inputs),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        **file_proof(npy, hashlib.sha256(data).hexdigest()),
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


# The settings-file section each artefact kind's recipe comes from: a change is named as the user writes it.
SETTINGS_SECTIONS = {"dinov3": "dinov3", "captions": "captioner", "vae_latents": "flux_vae", "t5_hidden": "t5"}


def recipe_change(record: Mapping[str, Any], recipe: Recipe) -> str | None:
    """Which settings differ between the recipe a record was made with and ``recipe``, each as
    ``"section.name old -> new"`` (``t5.max_length 77 -> 512``); None when the recipe is the same."""
    if record.get("recipe_hash") == recipe.hash:
        return None
    recorded = record.get("recipe")
    if not isinstance(recorded, Mapping):
        return f"made with an unrecorded recipe ({record.get('recipe_hash')} -> {recipe.hash})"
    current = recipe.as_dict()
    section = SETTINGS_SECTIONS.get(recipe.kind, recipe.kind)
    changes = [
        f"{section}.{name} {_setting(recorded, name)} -> {_setting(current, name)}"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
    ]
    return ", ".join(changes or [f"recipe {record.get('recipe_hash')} -> {recipe.hash}"])


def _setting(recipe: Mapping[str, Any], name: str) -> str:
    if name not in recipe:
        return "(unset)"
    value = recipe[name]
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


