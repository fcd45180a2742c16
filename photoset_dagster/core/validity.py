"""One judgment of whether a per-image artefact can be used, shared by every reader.

The stages (what to redo), ``verify`` (what to report), the dataset builder (what to include) and the
shard writer (what to pack) all ask :func:`judge`, so ``generate`` redoes exactly what ``verify``
reports and nothing invalid reaches the JSONL or a shard. An artefact is

* **missing** — no record (or its ``.npy`` is absent);
* **invalid** — the record is unreadable or malformed, or the ``.npy`` is not the file its sidecar
  describes (size, mtime and sha256 recorded when it was written);
* **stale** — intact but made with another recipe (the differing settings are named) or from other
  inputs (another raw file, another caption);
* **valid** — none of those.

Proof is cheap on the common path: a file whose size and mtime match its sidecar is not read; one
that moved is hashed, and is valid only if its bytes are still the ones written. The raw file gets
the same treatment against its facts record (:func:`raw_identity`), so new bytes under the same id
make the image's facts, and through their inputs everything downstream, stale at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .artefacts import Recipe, read_json, recipe_change, sha256_file
from .layout import PATCHES_DIR, DataLayout
from .records import is_attention_mask

State = Literal["valid", "missing", "invalid", "stale"]
VAE_CHANNELS = 16
VAE_DOWNSCALE = 8


@dataclass(frozen=True)
class Judgment:
    state: State
    reason: str = ""
    record: Mapping[str, Any] | None = None

    @property
    def valid(self) -> bool:
        return self.state == "valid"


# --- the proof of an .npy ---------------------------------------------------------------------------


def stat_proves(sidecar: Mapping[str, Any], size: int, mtime_ns: int) -> bool:
    """A file of this size and mtime is still the one ``sidecar`` hashed, trusted without reading it
    (a rewrite that keeps both is caught only by hashing: ``verify --deep``)."""
    return sidecar.get("npy_size") == size and sidecar.get("npy_mtime_ns") == mtime_ns


def npy_proof_problem(record: Mapping[str, Any], npy_path: os.PathLike[str] | str, *, deep: bool = False) -> str | None:
    """Why ``npy_path`` is not the file ``record`` (its sidecar) describes, or None. ``deep`` hashes even
    a file whose size and mtime still match."""
    try:
        stat = os.stat(npy_path)
    except FileNotFoundError:
        return "npy file missing"
    size, mtime, digest = record.get("npy_size"), record.get("npy_mtime_ns"), record.get("npy_sha256")
    if not (isinstance(size, int) and isinstance(mtime, int) and isinstance(digest, str)):
        return "sidecar has no proof of its .npy (written by an older photoset)"
    if stat.st_size != size:
        return f"npy file is {stat.st_size} bytes, its sidecar recorded {size} (truncated or replaced)"
    if stat_proves(record, stat.st_size, stat.st_mtime_ns) and not deep:
        return None
    if sha256_file(npy_path) != digest:
        return "npy content does not match its sidecar (edited or replaced)"
    return None


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _expected_shape(kind: str, sidecar: Mapping[str, Any]) -> tuple[tuple[int | None, ...], str] | str:
    """(shape, dtype) the sidecar implies for its array, or why the sidecar itself is malformed.
    dinov3 (hidden,) float32; vae (16, h/8, w/8) float16 from input_size [w, h]; t5 (len(mask), D)
    float16; patches (N, hidden) float32 from the dinov3 sidecar."""
    shape = sidecar.get("shape")
    if kind in ("dinov3", PATCHES_DIR):
        if not (isinstance(shape, list) and len(shape) == 1 and _positive_int(shape[0])):
            return f"recorded shape {shape} is not 1-D"
        return ((shape[0],), "float32") if kind == "dinov3" else ((None, shape[0]), "float32")
    if kind == "vae_latents":
        size = sidecar.get("input_size")
        valid = isinstance(size, list) and len(size) == 2
        if not (valid and all(_positive_int(v) and v % VAE_DOWNSCALE == 0 for v in size)):
            return f"recorded input_size {size} is not [w, h] in multiples of {VAE_DOWNSCALE}"
        width, height = size
        return (VAE_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE), "float16"
    if kind == "t5_hidden":
        mask = sidecar.get("attention_mask")
        if not is_attention_mask(mask):
            return "attention_mask is not a list of 0/1"
        if not (isinstance(shape, list) and len(shape) == 2 and _positive_int(shape[1])):
            return f"recorded shape {shape} is not (rows, hidden)"
        return (len(mask), shape[1]), "float16"
    raise ValueError(f"{kind!r} has no .npy artefact")


def sidecar_problem(kind: str, sidecar: Mapping[str, Any]) -> str | None:
    """Why a sidecar cannot describe a usable array of ``kind`` (shape, dtype, mask), or None."""
    expected = _expected_shape(kind, sidecar)
    if isinstance(expected, str):
        return expected
    shape, dtype = expected
    recorded = tuple(sidecar.get("shape") or ())
    if kind == "t5_hidden" and recorded and recorded[0] != shape[0]:
        return f"mask length {shape[0]} != hidden rows {recorded[0]}"
    if len(recorded) != len(shape) or any(e is not None and e != a for e, a in zip(shape, recorded)):
        return f"recorded shape {recorded} != expected {shape}"
    if sidecar.get("dtype") != dtype:
        return f"recorded dtype {sidecar.get('dtype')} != expected {dtype}"
    return None


# --- judging one artefact ---------------------------------------------------------------------------


def stale_reason(record: Mapping[str, Any], recipe: Recipe | None, inputs: Mapping[str, str]) -> str | None:
    """Why an artefact's record is not current, or None: its recipe changed (naming each setting) or it
    was made from other inputs."""
    if recipe is not None and (change := recipe_change(record, recipe)):
        return f"recipe changed ({change})"
    recorded = record.get("inputs") or {}
    changed = [name for name, value in inputs.items() if recorded.get(name) != value]
    if changed:
        what = {"raw_sha256": "the raw file", "caption_sha256": "the caption"}
        return "made from another " + " and ".join(what.get(name, name).removeprefix("the ") for name in changed)
    return None


def judge_npy(
    layout: DataLayout,
    kind: str,
    image_id: str,
    recipe: Recipe | None,
    inputs: Mapping[str, str],
    *,
    deep: bool = False,
    read: Callable[[Any], dict[str, Any] | None] = read_json,
) -> Judgment:
    """The judgment of ``kind``'s ``.npy`` artefact of ``image_id`` (dinov3, vae_latents, t5_hidden)."""
    sidecar_path, npy_path = layout.json_path(kind, image_id), layout.npy_path(kind, image_id)
    record = read(sidecar_path)
    if record is None:
        if not sidecar_path.exists() and not npy_path.exists():
            return Judgment("missing", f"{kind} missing")
        if not sidecar_path.exists():
            return Judgment("missing", f"{kind} .npy has no sidecar (an interrupted write)")
        return Judgment("invalid", f"{kind} sidecar unreadable: not a JSON object")
    problem = sidecar_problem(kind, record) or npy_proof_problem(record, npy_path, deep=deep)
    if problem == "npy file missing":
        return Judgment("missing", f"{kind} .npy missing (sidecar present)", record)
    if problem:
        return Judgment("invalid", f"{kind}: {problem}", record)
    if stale := stale_reason(record, recipe, inputs):
        return Judgment("stale", f"{kind} {stale}", record)
    return Judgment("valid", "", record)


def judge_caption(
    layout: DataLayout, image_id: str, recipe: Recipe | None, inputs: Mapping[str, str]
) -> Judgment:
    path = layout.json_path("captions", image_id)
    record = read_json(path)
    if record is None:
        return Judgment("invalid", "caption record unreadable") if path.exists() else Judgment("missing", "no caption")
    caption = record.get("caption")
    if not (isinstance(caption, str) and caption.strip()):
        return Judgment("invalid", "caption empty", record)
    if stale := stale_reason(record, recipe, inputs):
        return Judgment("stale", f"caption {stale}", record)
    return Judgment("valid", "", record)


def patches_problem(layout: DataLayout, image_id: str, dinov3_sidecar: Mapping[str, Any]) -> str | None:
    """Patch tokens carry their proof in the DINOv3 sidecar (``patches_proof``), which commits both."""
    proof = dinov3_sidecar.get("patches_proof")
    if not isinstance(proof, Mapping):
        return "dinov3 patch tokens have no proof in the sidecar"
    return npy_proof_problem(proof, layout.npy_path(PATCHES_DIR, image_id))


# --- the raw file behind the facts ------------------------------------------------------------------


def raw_fingerprint(stat: os.stat_result) -> dict[str, int]:
    return {"raw_size": stat.st_size, "raw_mtime_ns": stat.st_mtime_ns, "raw_inode": stat.st_ino}


def raw_identity(layout: DataLayout, image_id: str, facts: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(sha256 of the raw file as it is now, why the facts no longer describe it).

    The hash comes from the facts when the raw's size, mtime and inode still match what they recorded;
    otherwise the raw is hashed (a replaced file is caught without re-reading every raw every time).
    A facts record describing other bytes gives a reason; a missing raw gives (None, reason).
    """
    try:
        stat = os.stat(layout.raw_path(image_id))
    except FileNotFoundError:
        return None, "raw file missing"
    recorded = (facts or {}).get("inputs", {}).get("raw_sha256") if facts else None
    if facts is not None and all(facts.get(k) == v for k, v in raw_fingerprint(stat).items()):
        return recorded, None
    current = sha256_file(layout.raw_path(image_id))
    if facts is None:
        return current, "no facts yet"
    if current != recorded:
        return current, "the raw file changed since its facts were recorded"
    return current, None


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
