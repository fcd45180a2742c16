"""Runs the selected stages over a set of images, in pipeline order, as one stream of outcomes.

Stages run one after the other in one process, so each model loads once. An image that fails a
stage is *skipped* by every later stage that needs it (and says which stage failed, and why). Every
settled image updates the failure ledger, so ``verify``, the sensor and the report know what could
not be done. The whole run holds the data lock shared (prune takes it exclusively); when it can take
it alone at the start, it first sweeps the temporaries a killed writer left behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.atomic import remove_stale_temporaries
from ..core.failures import Failure, clear_failure, record_failure
from ..core.layout import JSON_KINDS, NPY_KINDS, PATCHES_DIR, DataLayout
from ..core.lock import DataLock
from ..core.photolist import PhotoItem
from ..core.preflight import check_free_space
from ..core.download import Downloader
from .base import APPROVED_LINKS, IMAGE_FACTS, MODEL_STAGES, STAGES, UPSTREAM, ModelStage, Note, Outcome, StageDone
from .facts import run_facts_stage
from .runner import run_model_stage
from .sync import SyncOptions, SyncStats, run_sync_stage

Item = Outcome | Note | StageDone
# How long a run waits for a prune to let go of the data (a prune of a whole list takes minutes).
SHARED_LOCK_WAIT_S = 3600.0


@dataclass
class SyncWork:
    """What the sync stage needs: the listed items (ids and URLs), a downloader and the seed's options."""

    items: Sequence[PhotoItem]
    downloader: Downloader
    options: SyncOptions = field(default_factory=SyncOptions)
    stats: SyncStats = field(default_factory=SyncStats)


@dataclass
class ModelWork:
    stage: ModelStage[Any]
    provider: Callable[[], Any]  # loads (once) and returns the model; called only when there is work


def run_pipeline(
    layout: DataLayout,
    stages: Iterable[str],
    image_ids: Sequence[str],
    *,
    sync: SyncWork | None = None,
    models: Mapping[str, ModelWork] | None = None,
    force: bool = False,
    dry_run: bool = False,
    run_id: str | None = None,
    cancel: threading.Event | None = None,
    min_free_gb: float = 0.0,
) -> Iterator[Item]:
    """Outcomes of ``stages`` (pipeline order; facts run whenever a model stage does) for ``image_ids``,
    with a :class:`StageDone` after each stage and log :class:`Note` s in between."""
    selected = [stage for stage in STAGES if stage in set(stages)]
    if any(stage in MODEL_STAGES for stage in selected) and IMAGE_FACTS not in selected:
        selected.insert(1 if APPROVED_LINKS in selected else 0, IMAGE_FACTS)
    models = models or {}
    if dry_run:  # reads only: no folders, no lock file, no ledger
        if APPROVED_LINKS in selected and sync is not None:
            yield from _timed(APPROVED_LINKS, run_sync_stage(sync.items, layout, sync.downloader, sync.options,
                                                             stats=sync.stats, cancel=cancel), sync.stats)
        return
    layout.ensure_dirs()
    lock = DataLock(layout.lock_path, exclusive=True, what=f"run {run_id or '(no run id)'}")
    if lock.try_acquire():  # alone: nobody can be writing, so leftover temporaries are garbage
        swept = sweep_temporaries(layout)
        if swept:
            yield Note(f"removed {swept} temporary file(s) left by an interrupted run")
        lock.downgrade()
    else:
        lock.exclusive = False
        yield from _acquire_shared(lock, cancel)
    try:
        failed: dict[str, dict[str, tuple[str, bool]]] = {}  # stage -> id -> (reason, skipped there)
        facts: dict[str, Mapping[str, Any]] = {}
        ids = list(dict.fromkeys(image_ids))
        for stage in selected:
            blocked = _blocked(stage, failed)
            todo = [image_id for image_id in ids if image_id not in blocked]
            if stage == APPROVED_LINKS:
                if sync is None:
                    raise ValueError("the sync stage needs the listed items and a downloader")
                stream: Iterator[Item] = run_sync_stage(sync.items, layout, sync.downloader, sync.options,
                                                        stats=sync.stats, cancel=cancel)
                stats: Any = sync.stats
            elif stage == IMAGE_FACTS:
                stream, stats = run_facts_stage(layout, todo, force=force, cancel=cancel), None
            else:
                work = models[stage]
                needed = {image_id: facts[image_id] for image_id in todo if image_id in facts}
                stream = run_model_stage(
                    work.stage, needed, work.provider, force=force, cancel=cancel,
                    preflight=lambda needed_bytes, name=stage: check_free_space(
                        layout.root, needed_bytes, min_free_gb, f"the {name} stage"),
                )
                stats = work
            skipped = [Outcome(stage, image_id, "skipped", reason=reason) for image_id, reason in blocked.items()]
            for item in _timed(stage, _chain(skipped, stream), stats):
                if isinstance(item, Outcome):
                    _settle(layout, item, run_id)
                    if item.ok and stage == IMAGE_FACTS and item.record is not None:
                        facts[item.image_id] = item.record
                    elif not item.ok:
                        failed.setdefault(stage, {})[item.image_id] = (item.reason, item.status == "skipped")
                yield item
    finally:
        lock.release()


def _acquire_shared(lock: DataLock, cancel: threading.Event | None) -> Iterator[Note]:
    """Wait for the shared lock (prune holds it), saying what it waits for every few seconds."""
    for message in lock.waiting(SHARED_LOCK_WAIT_S, cancel=cancel):
        yield Note(message, "warning")


def _blocked(stage: str, failed: Mapping[str, Mapping[str, tuple[str, bool]]]) -> dict[str, str]:
    """Images a stage this one needs (directly or through others) failed in this run: id -> why this
    stage does not attempt them ("image_facts failed: <reason>"). A failed DINOv3 embedding does not
    hold back the VAE."""
    blocked: dict[str, str] = {}
    needed = UPSTREAM.get(stage)
    while needed is not None:
        for image_id, (reason, skipped) in failed.get(needed, {}).items():
            blocked.setdefault(image_id, reason if skipped else f"{needed} failed: {reason}")
        needed = UPSTREAM.get(needed)
    return blocked


def _chain(first: Iterable[Item], then: Iterator[Item]) -> Iterator[Item]:
    yield from first
    yield from then


def _timed(stage: str, stream: Iterable[Item], stats: Any) -> Iterator[Item]:
    """Pass the stream through, then a StageDone with its counts and duration."""
    summary = StageDone(stage)
    started = time.perf_counter()
    for item in stream:
        if isinstance(item, Outcome):
            if item.status == "done":
                summary.done += 1
            elif item.status == "current":
                summary.current += 1
            else:
                summary.failed[item.image_id] = item.reason
        yield item
    summary.seconds = time.perf_counter() - started
    summary.stats = _stage_stats(stats)
    yield summary


def _stage_stats(stats: Any) -> dict[str, Any]:
    if isinstance(stats, SyncStats):
        return {"bytes_downloaded": stats.bytes_downloaded, "retry_budget_hit": stats.retry_budget_hit,
                **{f"failed_{kind}": count for kind, count in stats.failure_kinds.items()}}
    if isinstance(stats, ModelWork):
        model_stats = getattr(stats.provider, "stats", None)
        return dict(model_stats()) if callable(model_stats) else {}
    return {}


def _settle(layout: DataLayout, outcome: Outcome, run_id: str | None) -> None:
    if outcome.ok:
        clear_failure(layout, outcome.stage, outcome.image_id)
    else:
        record_failure(layout, Failure(outcome.image_id, outcome.stage, outcome.reason,
                                       upstream=outcome.status == "skipped", run_id=run_id))


def sweep_temporaries(layout: DataLayout) -> int:
    """Temporaries a killed writer left in raw/ and every artefact folder (call only while no
    writer can be running: under the exclusive data lock)."""
    folders = [layout.raw_dir, *(layout.kind_dir(kind) for kind in (*JSON_KINDS, *NPY_KINDS, PATCHES_DIR)),
               layout.thumbnails_dir, layout.derived_dir]
    return sum(remove_stale_temporaries(folder) for folder in folders)
