"""Verification of the per-image artefacts and the dataset JSONL (the seed's ``--verify``, rebuilt).

Every artefact is judged by :mod:`core.validity` — the same judgment the stages use to decide what to
redo, so ``generate`` redoes exactly what ``verify`` reports. An image that failed its last attempt
for a reason (the failure ledger) *cannot be processed*; one with no artefact and no recorded
failure is *not done yet*. Verification passes when everything that can be done is done and valid;
``strict`` also counts images that cannot be processed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .artefacts import Recipe, read_json, text_hash
from .dataset import facts_problem
from .failures import iter_failures
from .layout import NPY_KINDS, PATCHES_DIR, DataLayout, is_valid_image_id
from .lock import data_lock
from .records import iter_jsonl, stage2_record_problems
from .validity import Judgment, judge_caption, judge_npy, patches_problem, raw_identity

DEFAULT_KINDS = ("facts", "captions", "dinov3", "vae_latents", "t5_hidden")
KIND_LABELS = {
    "facts": "Facts",
    "captions": "Captions",
    "dinov3": "DINOv3 embeddings",
    "vae_latents": "VAE latents",
    "t5_hidden": "T5 hidden states",
    PATCHES_DIR: "DINOv3 patches",
}
# The stage (asset) that makes each kind, as the failure ledger names it.
KIND_STAGES = {"facts": "image_facts", "captions": "captions", "dinov3": "dinov3_embeddings",
               "vae_latents": "vae_latents", "t5_hidden": "t5_hidden", PATCHES_DIR: "dinov3_embeddings"}


def judge_image(
    layout: DataLayout, image_id: str, recipes: Mapping[str, Recipe], kinds: Sequence[str] = DEFAULT_KINDS,
    *, deep: bool = False,
) -> dict[str, Judgment]:
    """The judgment of each of ``kinds`` for one image, with the recipes in force."""
    facts = read_json(layout.json_path("facts", image_id))
    raw_sha256, raw_changed = raw_identity(layout, image_id, facts) if facts is not None else (None, None)
    raw_inputs = {"raw_sha256": raw_sha256} if raw_sha256 else {}
    judged: dict[str, Judgment] = {}
    for kind in kinds:
        if kind == "facts":
            judged[kind] = _judge_facts(layout, image_id, facts, raw_sha256, raw_changed)
        elif kind == "captions":
            judged[kind] = judge_caption(layout, image_id, recipes.get("captions"), raw_inputs)
        elif kind == "t5_hidden":
            caption = (read_json(layout.json_path("captions", image_id)) or {}).get("caption")
            inputs = {"caption_sha256": text_hash(caption)} if isinstance(caption, str) else {}
            judged[kind] = judge_npy(layout, kind, image_id, recipes.get(kind), inputs, deep=deep)
        elif kind == PATCHES_DIR:
            dinov3 = read_json(layout.json_path("dinov3", image_id))
            problem = patches_problem(layout, image_id, dinov3) if dinov3 is not None else "dinov3 missing"
            judged[kind] = Judgment("invalid", problem) if problem else Judgment("valid")
        elif kind in NPY_KINDS:
            judged[kind] = judge_npy(layout, kind, image_id, recipes.get(kind), raw_inputs, deep=deep)
        else:
            raise ValueError(f"unknown artefact kind {kind!r}")
    return judged


def _judge_facts(layout: DataLayout, image_id: str, facts, raw_sha256, raw_changed) -> Judgment:
    if facts is None:
        path = layout.json_path("facts", image_id)
        return Judgment("invalid", "facts unreadable") if path.exists() else Judgment("missing", "no facts")
    if problem := facts_problem(facts):
        return Judgment("invalid", problem, facts)
    if raw_sha256 is None:
        return Judgment("invalid", "raw file missing", facts)
    if raw_changed:
        return Judgment("stale", raw_changed, facts)
    return Judgment("valid", "", facts)


@dataclass
class KindReport:
    valid: int = 0
    invalid: dict[str, str] = field(default_factory=dict)  # id -> reason
    missing: dict[str, str] = field(default_factory=dict)  # not done yet: id -> reason
    stale: dict[str, str] = field(default_factory=dict)  # intact but not current: id -> reason (names the setting)
    cannot_process: dict[str, str] = field(default_factory=dict)  # failed its last attempt: id -> reason

    def ok(self, strict: bool) -> bool:
        return not (self.invalid or self.missing or self.stale or (strict and self.cannot_process))


@dataclass
class VerifyReport:
    kinds: dict[str, KindReport]
    dataset_problems: list[str]
    images: int = 0
    strict: bool = False

    @property
    def ok(self) -> bool:
        return not self.dataset_problems and all(report.ok(self.strict) for report in self.kinds.values())

    def summary_lines(self, max_listed: int = 20) -> list[str]:
        lines = ["=== Stage 2 Data Verification ===", f"verifying {self.images} images..."]
        for kind, report in self.kinds.items():
            lines += [
                f"\n{KIND_LABELS.get(kind, kind)}:",
                f"  valid: {report.valid}",
                f"  invalid: {len(report.invalid)}",
                f"  stale: {len(report.stale)}",
                f"  missing (not done yet): {len(report.missing)}",
                f"  cannot be processed: {len(report.cannot_process)}",
            ]
            for label, entries in (("invalid", report.invalid), ("stale", report.stale),
                                   ("missing", report.missing), ("cannot be processed", report.cannot_process)):
                listed = list(entries.items())
                lines += [f"  {label} {kind} for {image_id}: {reason}" for image_id, reason in listed[:max_listed]]
                if len(listed) > max_listed:
                    lines.append(f"  ... and {len(listed) - max_listed} more {label}")
        lines += ["\nDataset JSONL:", f"  problems: {len(self.dataset_problems)}"]
        lines += [f"  {problem}" for problem in self.dataset_problems[:max_listed]]
        if len(self.dataset_problems) > max_listed:
            lines.append(f"  ... and {len(self.dataset_problems) - max_listed} more")
        verdict = "OK" if self.ok else "FAILED"
        cannot = sum(len(report.cannot_process) for report in self.kinds.values())
        note = f" ({cannot} artefacts of images that cannot be processed" + (
            " count against it: --strict)" if self.strict else " are listed, not counted; --strict counts them)")
        lines.append(f"\nverification {verdict}" + (note if cannot else ""))
        return lines


def verify_artefacts(
    layout: DataLayout,
    image_ids: Iterable[str],
    recipes: Mapping[str, Recipe],
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    strict: bool = False,
    deep: bool = False,
) -> VerifyReport:
    """Judge every artefact of ``kinds`` for ``image_ids`` and check the dataset JSONL."""
    ids = sorted(set(image_ids))
    report = VerifyReport(kinds={kind: KindReport() for kind in kinds}, dataset_problems=[], images=len(ids),
                          strict=strict)
    with data_lock(layout.lock_path, exclusive=False, what="verify"):
        failures = {(failure.stage, failure.image_id): failure.reason for failure in iter_failures(layout)}
        for image_id in ids:
            if not is_valid_image_id(image_id):
                for kind_report in report.kinds.values():
                    kind_report.invalid[image_id] = "invalid image id"
                continue
            for kind, judgment in judge_image(layout, image_id, recipes, kinds, deep=deep).items():
                kind_report = report.kinds[kind]
                if judgment.valid:
                    kind_report.valid += 1
                elif judgment.state == "missing":
                    failure = failures.get((KIND_STAGES[kind], image_id))
                    if failure is not None:
                        kind_report.cannot_process[image_id] = failure
                    else:
                        kind_report.missing[image_id] = judgment.reason
                elif judgment.state == "stale":
                    kind_report.stale[image_id] = judgment.reason
                else:
                    kind_report.invalid[image_id] = judgment.reason
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
