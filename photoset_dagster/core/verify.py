"""Integrity checks of the per-image artefacts and the dataset JSONL (the seed's ``--verify``, rebuilt).

Unlike the original, every array is checked against what its sidecar says it should be (shape, dtype,
finite values, T5 mask length), and patches are checked too. Arrays are opened with ``mmap_mode="r"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artefacts import read_json, staleness
from .dataset import expected_inputs, facts_problem
from .layout import NPY_KINDS, PATCHES_DIR, DataLayout, is_valid_image_id
from .lock import data_lock
from .records import is_attention_mask, iter_jsonl, stage2_record_problems

DEFAULT_KINDS = ("facts", "captions", "dinov3", "vae_latents", "t5_hidden")
VAE_CHANNELS = 16
VAE_DOWNSCALE = 8
KIND_LABELS = {
    "facts": "Facts",
    "captions": "Captions",
    "dinov3": "DINOv3 embeddings",
    "vae_latents": "VAE latents",
    "t5_hidden": "T5 hidden states",
    PATCHES_DIR: "DINOv3 patches",
}


class _Invalid(ValueError):
    """An artefact that fails a check; the message is the reason."""


@dataclass(frozen=True)
class ArrayExpectation:
    shape: tuple[int | None, ...]  # None: any length on that axis
    dtype: str

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(e is None or e == a for e, a in zip(self.shape, shape))


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _expect_dinov3(sidecar: Mapping[str, Any]) -> ArrayExpectation:
    shape = sidecar.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and _positive_int(shape[0])):
        raise _Invalid(f"recorded shape {shape} is not 1-D")
    return ArrayExpectation((shape[0],), "float32")


def _expect_vae(sidecar: Mapping[str, Any]) -> ArrayExpectation:
    size = sidecar.get("input_size")
    valid = isinstance(size, list) and len(size) == 2
    if not (valid and all(_positive_int(v) and v % VAE_DOWNSCALE == 0 for v in size)):
        raise _Invalid(f"recorded input_size {size} is not [w, h] in multiples of {VAE_DOWNSCALE}")
    width, height = size
    return ArrayExpectation((VAE_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE), "float16")


def _expect_t5(sidecar: Mapping[str, Any]) -> ArrayExpectation:
    mask, shape = sidecar.get("attention_mask"), sidecar.get("shape")
    if not is_attention_mask(mask):
        raise _Invalid("attention_mask is not a list of 0/1")
    if not (isinstance(shape, list) and len(shape) == 2 and _positive_int(shape[1])):
        raise _Invalid(f"recorded shape {shape} is not (rows, hidden)")
    return ArrayExpectation((len(mask), shape[1]), "float16")


def _expect_patches(dinov3_sidecar: Mapping[str, Any]) -> ArrayExpectation:
    return ArrayExpectation((None, _expect_dinov3(dinov3_sidecar).shape[0]), "float32")


# kind -> expectation derived from its sidecar (for patches: the dinov3 sidecar, patches have none):
# dinov3 (hidden,) float32 with hidden as recorded; vae (16, h/8, w/8) float16 from input_size [w, h];
# t5 (L, D) float16 with L = len(attention_mask); patches (N, hidden) float32.
EXPECTED: dict[str, Callable[[Mapping[str, Any]], ArrayExpectation]] = {
    "dinov3": _expect_dinov3,
    "vae_latents": _expect_vae,
    "t5_hidden": _expect_t5,
    PATCHES_DIR: _expect_patches,
}


def _load_record(path: Path, what: str = "") -> dict[str, Any]:
    """The JSON record at ``path``; ``what`` names it in the reason ("sidecar ")."""
    if not path.exists():
        raise _Invalid(f"{what}missing")
    record = read_json(path)
    if record is None:
        raise _Invalid(f"{what}unloadable: not a JSON object")
    return record


def _check_facts(layout: DataLayout, image_id: str) -> None:
    facts = _load_record(layout.json_path("facts", image_id))
    problem = facts_problem(facts)
    if problem:
        raise _Invalid(problem)


def _check_captions(layout: DataLayout, image_id: str) -> None:
    record = _load_record(layout.json_path("captions", image_id))
    caption = record.get("caption")
    if not (isinstance(caption, str) and caption.strip()):
        raise _Invalid("caption empty")


def _check_array(layout: DataLayout, kind: str, image_id: str) -> None:
    npy = layout.npy_path(kind, image_id)
    sidecar_kind = "dinov3" if kind == PATCHES_DIR else kind
    sidecar_path = layout.json_path(sidecar_kind, image_id)
    if not npy.exists():
        raise _Invalid("missing")
    sidecar = _load_record(sidecar_path, "sidecar ")
    try:
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _Invalid(f"unloadable: {error}") from None
    actual_shape, actual_dtype = tuple(array.shape), str(array.dtype)
    if kind != PATCHES_DIR:  # patches have no sidecar of their own to compare against
        recorded = tuple(sidecar.get("shape") or ())
        if actual_shape != recorded:
            raise _Invalid(f"shape {actual_shape} != recorded {recorded}")
        if actual_dtype != sidecar.get("dtype"):
            raise _Invalid(f"dtype {actual_dtype} != recorded {sidecar.get('dtype')}")
    expected = EXPECTED[kind](sidecar)
    if kind == "t5_hidden" and actual_shape[0] != expected.shape[0]:
        raise _Invalid(f"mask length {expected.shape[0]} != hidden rows {actual_shape[0]}")
    if not expected.matches(actual_shape):
        raise _Invalid(f"shape {actual_shape} != expected {expected.shape}")
    if actual_dtype != expected.dtype:
        raise _Invalid(f"dtype {actual_dtype} != expected {expected.dtype}")
    if not np.isfinite(array).all():
        raise _Invalid("non-finite values")


def check_artefact(layout: DataLayout, kind: str, image_id: str) -> str | None:
    """None if ``kind``'s artefact for ``image_id`` is intact, else why not ("missing", "sidecar missing",
    "unloadable: …", "shape (…) != recorded (…)", "non-finite values", "caption empty", ...).

    Kinds: facts, captions, dinov3, vae_latents, t5_hidden, dinov3_patches. Integrity only: whether the
    artefact is current for the configured recipe is :func:`verify_artefacts`' job.
    """
    try:
        if kind == "facts":
            _check_facts(layout, image_id)
        elif kind == "captions":
            _check_captions(layout, image_id)
        elif kind in NPY_KINDS or kind == PATCHES_DIR:
            _check_array(layout, kind, image_id)
        else:
            raise ValueError(f"unknown artefact kind {kind!r}")
    except _Invalid as reason:
        return str(reason)
    return None


@dataclass
class KindReport:
    valid: int = 0  # intact and current
    invalid: dict[str, str] = field(default_factory=dict)  # id -> reason
    missing: list[str] = field(default_factory=list)
    stale: dict[str, str] = field(default_factory=dict)  # intact but not current: id -> reason

    @property
    def ok(self) -> bool:
        return not (self.invalid or self.missing or self.stale)


@dataclass
class VerifyReport:
    kinds: dict[str, KindReport]
    dataset_problems: list[str]
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.dataset_problems and all(report.ok for report in self.kinds.values())

    def summary_lines(self, max_listed: int = 50) -> list[str]:
        lines = ["=== Stage 2 Data Verification ===", f"verifying {self.images} images..."]
        for kind, report in self.kinds.items():
            lines += [
                f"\n{KIND_LABELS.get(kind, kind)}:",
                f"  valid: {report.valid}",
                f"  invalid: {len(report.invalid)}",
                f"  missing: {len(report.missing)}",
                f"  stale: {len(report.stale)}",
            ]
            listed = [f"  invalid {kind} for {i}: {reason}" for i, reason in report.invalid.items()]
            listed += [f"  stale {kind} for {i}: {reason}" for i, reason in report.stale.items()]
            lines += listed[:max_listed]
            if len(listed) > max_listed:
                lines.append(f"  ... and {len(listed) - max_listed} more")
        lines += ["\nDataset JSONL:", f"  problems: {len(self.dataset_problems)}"]
        lines += [f"  {problem}" for problem in self.dataset_problems[:max_listed]]
        if len(self.dataset_problems) > max_listed:
            lines.append(f"  ... and {len(self.dataset_problems) - max_listed} more")
        return lines


def _staleness(
    layout: DataLayout,
    kind: str,
    image_id: str,
    recipe_hashes: Mapping[str, str],
    raw_sha256: str | None,
    caption: str | None,
) -> str | None:
    if kind == "facts":
        return None
    sidecar_kind = "dinov3" if kind == PATCHES_DIR else kind
    record = read_json(layout.json_path(sidecar_kind, image_id))
    return staleness(record, recipe_hashes.get(sidecar_kind), expected_inputs(sidecar_kind, raw_sha256, caption))


def verify_artefacts(
    layout: DataLayout,
    image_ids: Iterable[str],
    recipe_hashes: Mapping[str, str],
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> VerifyReport:
    """Check every artefact of ``kinds`` for ``image_ids`` (integrity, then currency) and the dataset JSONL."""
    ids = sorted(set(image_ids))
    report = VerifyReport(kinds={kind: KindReport() for kind in kinds}, dataset_problems=[], images=len(ids))
    with data_lock(layout.lock_path, exclusive=False):
        for image_id in ids:
            if not is_valid_image_id(image_id):
                for kind_report in report.kinds.values():
                    kind_report.invalid[image_id] = "invalid image id"
                continue
            facts = read_json(layout.json_path("facts", image_id)) or {}
            captions = read_json(layout.json_path("captions", image_id)) or {}
            raw_sha256 = (facts.get("inputs") or {}).get("raw_sha256")
            for kind, kind_report in report.kinds.items():
                reason = check_artefact(layout, kind, image_id)
                if reason == "missing":
                    kind_report.missing.append(image_id)
                elif reason is not None:
                    kind_report.invalid[image_id] = reason
                elif stale := _staleness(layout, kind, image_id, recipe_hashes, raw_sha256, captions.get("caption")):
                    kind_report.stale[image_id] = stale
                else:
                    kind_report.valid += 1
        report.dataset_problems = verify_dataset_jsonl(layout)
    return report


def _npy_ids(layout: DataLayout, kind: str) -> set[str]:
    try:
        return {entry.name[:-4] for entry in os.scandir(layout.kind_dir(kind)) if entry.name.endswith(".npy")}
    except FileNotFoundError:
        return set()


def verify_dataset_jsonl(layout: DataLayout) -> list[str]:
    """Problems of the dataset JSONL: unparsable lines, duplicate ids, missing or invalid fields, an
    ``image_path`` that is not the approved link, referenced ``.npy`` files that do not exist."""
    path = layout.dataset_jsonl
    if not path.is_file():
        return [f"{path} does not exist"]
    npy_ids = {kind: _npy_ids(layout, kind) for kind in NPY_KINDS}
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, record, _ in iter_jsonl(path):
        if record is None:
            problems.append(f"line {line_no}: unparsable (not a JSON object)")
            continue
        image_id = record.get("image_id")
        if not is_valid_image_id(image_id):
            problems.append(f"line {line_no}: image_id {image_id!r} invalid")
            continue
        if image_id in first_line:
            problems.append(f"line {line_no}: duplicate image_id {image_id} (first on line {first_line[image_id]})")
            continue
        first_line[image_id] = line_no
        found = stage2_record_problems(record)
        image_path = record.get("image_path")
        ext = image_path.rpartition(".")[2] if isinstance(image_path, str) else ""
        if "image_path" in record and (not ext.isalnum() or image_path != layout.image_path_field(image_id, ext)):
            found.append(f"image_path {image_path!r} is not {layout.image_path_field(image_id, '<ext>')}")
        mask, max_length = record.get("t5_attention_mask"), record.get("t5_max_length")
        if isinstance(mask, list) and max_length is not None and len(mask) != max_length:
            found.append(f"t5_attention_mask length {len(mask)} != t5_max_length {max_length}")
        found += [f"{kind} npy missing" for kind in NPY_KINDS if image_id not in npy_ids[kind]]
        problems += [f"line {line_no} ({image_id}): {problem}" for problem in found]
    return problems
