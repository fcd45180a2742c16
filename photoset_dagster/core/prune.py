"""Removing what is no longer approved (the seed's ``prune_dataset.py`` and the sync-driven prune, rebuilt).

Two steps so a person or a sensor can look before anything goes: :func:`plan_prune` compares what is on
disk with the approved list; :func:`execute_prune` deletes it under the exclusive data lock. Guards the
original lacked: an incomplete listing is refused, and so is removing more than a fraction of the
dataset at once (an empty or truncated remote list must never wipe it). Approved images are never
deleted: a still-approved id whose raw file is missing only loses its broken link.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .artefacts import read_json
from .buckets import BUCKET_NAMES
from .layout import JSON_KINDS, NPY_KINDS, PATCHES_DIR, DataLayout, is_valid_image_id
from .failures import forget_image
from .links import scan_approved_links
from .lock import data_lock
from .records import iter_jsonl, record_image_id, write_jsonl_atomic


class PruneRefused(RuntimeError):
    """Pruning would be unsafe (incomplete listing, too much at once); nothing was deleted."""


@dataclass
class PrunePlan:
    removed_ids: list[str]  # ids present locally but not approved
    broken_links: list[Path]  # links of still-approved ids whose raw file is missing (only the link goes)
    files: list[Path]  # every existing file of removed_ids: approved links, raw file, derived files
    jsonl_records: int  # dataset JSONL records that will be dropped
    known_ids: int  # ids present locally (the guard's denominator)
    affected_buckets: set[str]  # buckets of removed ids: their shards need a rebuild
    approved_ids: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def fraction(self) -> float:
        return len(self.removed_ids) / self.known_ids if self.known_ids else 0.0

    def summary_lines(self) -> list[str]:
        return [
            "Discovery Results:",
            f"  Broken symlinks:    {len(self.broken_links)}",
            f"  Removed ids:        {len(self.removed_ids)}",
            f"  JSONL records:      {self.jsonl_records}",
            f"  Files to delete:    {len(self.files)}",
            f"  Known ids:          {self.known_ids} ({self.fraction:.1%} to remove)",
            f"  Affected buckets:   {', '.join(sorted(self.affected_buckets)) or '-'}",
        ]


# files_removed keys, with the seed's summary labels first
_NPY_LABELS = {"dinov3": "DINOv3 embeddings", "vae_latents": "VAE latents", "t5_hidden": "T5 hidden states"}
_OTHER_LABELS = {
    PATCHES_DIR: "DINOv3 patches",
    "sidecars": "Sidecars",
    "captions": "Captions",
    "facts": "Facts",
    "thumbnails": "Thumbnails",
    "raw files": "Raw files",
}


@dataclass
class PruneReport:
    dry_run: bool
    links_removed: int  # broken links of approved ids + links of removed ids
    records_removed: int
    files_removed: dict[str, int]  # category ("broken links", "approved links", "dinov3", "sidecars", ...) -> count
    removed_ids: list[str]
    affected_buckets: set[str]
    not_removed: dict[str, str] = field(default_factory=dict)  # path -> why it was left in place

    def summary_lines(self) -> list[str]:
        count = self.files_removed.get
        npy_total = sum(count(kind, 0) for kind in (*NPY_KINDS, PATCHES_DIR))
        lines = ["Summary (dry run: nothing was deleted):" if self.dry_run else "Summary:"]
        lines += [
            f"  Broken symlinks deleted:     {count('broken links', 0)}",
            f"  Approved links deleted:      {count('approved links', 0)}",
            f"  JSONL records removed:       {self.records_removed}",
        ]
        lines += [f"  {label + ' deleted:':<29}{count(kind, 0)}" for kind, label in _NPY_LABELS.items()]
        lines.append(f"  Total .npy files deleted:    {npy_total}")
        lines += [f"  {label + ' deleted:':<29}{count(key, 0)}" for key, label in _OTHER_LABELS.items()]
        lines += [f"  not removed {path}: {why}" for path, why in self.not_removed.items()]
        return lines


# --- discovery -----------------------------------------------------------------------------------


@dataclass
class _Inventory:
    """What is on disk, from one ``os.scandir`` per folder (no per-id probing)."""

    links: dict[str, list[str]]  # id -> link extensions in approved/
    raw_entries: set[str]  # ids with anything at raw/<id>
    raw_files: set[str]  # ids whose raw/<id> is a file
    derived_names: dict[Path, set[str]]  # derived folder -> entry names
    jsonl_records: Counter[str]  # id -> number of JSONL records
    jsonl_buckets: dict[str, str]

    def local_ids(self) -> set[str]:
        ids = set(self.links) | self.raw_entries | set(self.jsonl_records)
        for names in self.derived_names.values():
            stems = (name.rpartition(".") for name in names)
            ids.update(stem for stem, _, suffix in stems if suffix in ("json", "npy"))
        return {image_id for image_id in ids if is_valid_image_id(image_id)}

    def files_of(self, layout: DataLayout, image_id: str) -> list[Path]:
        files = [layout.approved_link(image_id, ext) for ext in self.links.get(image_id, [])]
        if image_id in self.raw_entries:
            files.append(layout.raw_path(image_id))
        files += [path for path in layout.derived_paths(image_id) if path.name in self.derived_names[path.parent]]
        return files


def _entry_names(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(directory))
    except FileNotFoundError:
        return []


def _inventory(layout: DataLayout) -> _Inventory:
    raw_entries, raw_files = set(), set()
    for entry in _entry_names(layout.raw_dir):
        raw_entries.add(entry.name)
        if entry.is_file(follow_symlinks=False):  # a link at raw/<id> (maybe out of the root) is no raw file
            raw_files.add(entry.name)
    folders = [layout.kind_dir(kind) for kind in (*JSON_KINDS, *NPY_KINDS, PATCHES_DIR)] + [layout.thumbnails_dir]
    derived_names = {folder: {entry.name for entry in _entry_names(folder)} for folder in folders}
    records: Counter[str] = Counter()
    buckets: dict[str, str] = {}
    if layout.dataset_jsonl.is_file():
        for _, record, _ in iter_jsonl(layout.dataset_jsonl):
            image_id = record_image_id(record) if record is not None else None
            if image_id is not None:
                records[image_id] += 1
                if record.get("aspect_bucket") in BUCKET_NAMES:
                    buckets[image_id] = record["aspect_bucket"]
    return _Inventory(scan_approved_links(layout), raw_entries, raw_files, derived_names, records, buckets)


def _buckets_of(layout: DataLayout, inventory: _Inventory, ids: Collection[str]) -> set[str]:
    """Buckets the ids' samples were in, from their facts or, when those are gone, their JSONL records."""
    buckets = set()
    for image_id in ids:
        facts = read_json(layout.json_path("facts", image_id)) or {}
        candidates = (facts.get("aspect_bucket"), inventory.jsonl_buckets.get(image_id))
        buckets.update(bucket for bucket in candidates if bucket in BUCKET_NAMES)
    return buckets


def _plan(layout: DataLayout, approved: frozenset[str]) -> tuple[PrunePlan, _Inventory]:
    inventory = _inventory(layout)
    known = inventory.local_ids()
    removed = sorted(known - approved)
    broken = [
        layout.approved_link(image_id, ext)
        for image_id, exts in sorted(inventory.links.items())
        if image_id in approved and image_id not in inventory.raw_files
        for ext in exts
    ]
    plan = PrunePlan(
        removed_ids=removed,
        broken_links=broken,
        files=[path for image_id in removed for path in inventory.files_of(layout, image_id)],
        jsonl_records=sum(inventory.jsonl_records[image_id] for image_id in removed),
        known_ids=len(known),
        affected_buckets=_buckets_of(layout, inventory, removed),
        approved_ids=approved,
    )
    return plan, inventory


def plan_prune(layout: DataLayout, approved_ids: Collection[str], *, listing_complete: bool) -> PrunePlan:
    """What a prune against ``approved_ids`` would remove. Refuses when the listing was incomplete: an id
    missing from a partial list is not a removed id."""
    if not listing_complete:
        raise PruneRefused("the photo list was incomplete (a page failed); nothing pruned")
    return _plan(layout, frozenset(approved_ids))[0]


# --- execution -----------------------------------------------------------------------------------


def _check_guard(plan: PrunePlan, max_fraction: float) -> None:
    if not plan.approved_ids and plan.known_ids:
        raise PruneRefused(
            f"the approved list is empty but {plan.known_ids} ids are present locally: refusing to delete "
            "everything; pass force to override"
        )
    if plan.fraction > max_fraction:
        raise PruneRefused(
            f"refusing to remove {len(plan.removed_ids)} of {plan.known_ids} local ids ({plan.fraction:.1%} > "
            f"{max_fraction:.1%} allowed); pass force to override"
        )


def _category(layout: DataLayout, path: Path) -> str:
    folder = path.parent
    if folder == layout.approved_dir:
        return "approved links"
    if folder == layout.raw_dir:
        return "raw files"
    if folder.name in NPY_KINDS and path.suffix == ".json":
        return "sidecars"
    return folder.name  # facts, captions, dinov3, vae_latents, t5_hidden (npy), dinov3_patches


def _unlink_inside_root(layout: DataLayout, path: Path) -> str | None:
    """Unlink ``path`` itself (a link is removed, never followed); returns why not, or None when removed."""
    if not layout.contains(path.parent):
        return "its folder lies outside the data root"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "already gone"
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        return "not a regular file or link"
    os.unlink(path)
    return None


def _remove_records(layout: DataLayout, ids: set[str], dry_run: bool) -> int:
    """Drop the records of ``ids`` from the dataset JSONL (other lines, malformed ones too, kept verbatim)."""
    if not layout.dataset_jsonl.is_file():
        return 0
    kept: list[str] = []
    removed = 0
    for _, record, raw in iter_jsonl(layout.dataset_jsonl):
        if record is not None and record_image_id(record) in ids:
            removed += 1
        else:
            kept.append(raw)
    if removed and not dry_run:
        write_jsonl_atomic(layout.dataset_jsonl, kept)
    return removed


def execute_prune(
    layout: DataLayout,
    plan: PrunePlan,
    *,
    dry_run: bool = False,
    max_fraction: float = 0.10,
    force: bool = False,
    lock_timeout_s: float = 600.0,
) -> PruneReport:
    """Delete what ``plan`` lists, under the exclusive data lock (so no pass writes meanwhile).

    The disk is scanned again under the lock and only ids of the plan that are still unapproved lose
    their files, including files written since planning; files already gone are skipped. Only entries
    inside the data root are unlinked, and links are removed, never followed. ``dry_run`` reports the same
    numbers and changes nothing. Raises PruneRefused when the plan removes more than ``max_fraction`` of
    the local ids, or everything because the approved list is empty, unless ``force``.
    """
    if not force:
        _check_guard(plan, max_fraction)
    report = PruneReport(dry_run, 0, 0, {}, [], set())
    with data_lock(layout.lock_path, exclusive=not dry_run, timeout_s=lock_timeout_s):
        current, inventory = _plan(layout, plan.approved_ids)
        ids = set(plan.removed_ids) & set(current.removed_ids)
        broken = set(plan.broken_links) & set(current.broken_links)
        report.removed_ids = sorted(ids)
        report.affected_buckets = _buckets_of(layout, inventory, ids)
        report.records_removed = _remove_records(layout, ids, dry_run)
        counts: Counter[str] = Counter()
        targets = [(path, "broken links") for path in sorted(broken)]
        for image_id in report.removed_ids:
            targets += [(path, _category(layout, path)) for path in inventory.files_of(layout, image_id)]
        for path, category in targets:
            if dry_run:
                counts[category] += 1
                continue
            why = _unlink_inside_root(layout, path)
            if why is None:
                counts[category] += 1
            elif why != "already gone":
                report.not_removed[str(path)] = why
        if not dry_run:  # what failed for an image that is gone is no longer news
            for image_id in report.removed_ids:
                forget_image(layout, image_id)
        report.files_removed = dict(counts)
        report.links_removed = counts["broken links"] + counts["approved links"]
    return report

