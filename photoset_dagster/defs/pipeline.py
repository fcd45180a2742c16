"""The per-image pipeline, shared by the partitioned asset and the catch-up job.

One function runs the selected stages in pipeline order over a list of image ids, inside one
process, so each model loads once per run. Every image that finishes a stage is logged at once as
a per-partition materialization (a crash keeps everything logged so far, and the files written so
far are complete); images that fail are reported with their reason and retried by the next run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dagster as dg

from .. import passes
from ..core.download import Downloader
from ..core.links import raw_present, scan_approved_links
from ..core.lock import data_lock
from ..core.photolist import PhotoItem, load_listing
from ..core.progress import ProgressMeter
from ..core.sync import SyncOptions, sync_images
from .metadata import markdown_table
from .resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model

APPROVED_LINKS = "approved_links"
IMAGE_FACTS = "image_facts"
CAPTIONS = "captions"
DINOV3 = "dinov3_embeddings"
VAE = "vae_latents"
T5 = "t5_hidden"
# Pipeline order: each stage only needs stages before it.
STAGES: tuple[str, ...] = (APPROVED_LINKS, IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5)
MODEL_STAGES: tuple[str, ...] = (CAPTIONS, DINOV3, VAE, T5)
# The short pass names of the seed's --pass flag.
PASS_STAGES: dict[str, tuple[str, ...]] = {
    "sync": (APPROVED_LINKS,),
    "facts": (IMAGE_FACTS,),
    "captions": (IMAGE_FACTS, CAPTIONS),
    "dinov3": (IMAGE_FACTS, DINOV3),
    "vae": (IMAGE_FACTS, VAE),
    "t5": (T5,),
    "all": (IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5),
}
MAX_CAPTION_PREVIEW = 400
T = TypeVar("T")


@dataclass
class ModelResources:
    dinov3: Dinov3Model
    captioner: CaptionModel
    flux_vae: FluxVaeModel
    t5: T5Model


@dataclass
class StageSummary:
    stage: str
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def _record_metadata(stage: str, record: dict[str, Any]) -> dict[str, Any]:
    """Small, useful per-image metadata (what a person checks when clicking one partition)."""
    if stage == IMAGE_FACTS:
        keys = ("width", "height", "aspect_bucket", "format", "mode", "frames")
        return {k: record[k] for k in keys if k in record}
    if stage == CAPTIONS:
        caption = record.get("caption", "")
        return {
            "caption": dg.MetadataValue.text(caption[:MAX_CAPTION_PREVIEW]),
            "words": len(caption.split()),
            "recipe_hash": record.get("recipe_hash", ""),
        }
    meta: dict[str, Any] = {
        "shape": str(tuple(record.get("shape", ()))),
        "dtype": record.get("dtype", ""),
        "recipe_hash": record.get("recipe_hash", ""),
    }
    if stage == T5:
        meta["token_count"] = record.get("token_count", 0)
    return meta


_DONE = object()


@dataclass(frozen=True)
class _LogLine:
    level: str
    message: str


class _Reporter:
    """Runs one stage in a worker thread and hands its per-image events back to the op's thread.

    Dagster persists an event when the op *yields* it (``log_event`` only buffers until the next
    yield), and its storage is not for concurrent writers. So the worker only queues events and log
    lines; the op's thread yields them as they come, writing the event log while the models work.
    """

    def __init__(self, stage: str, total: int, emit_skipped: Collection[str]):
        self.stage = stage
        self.asset_key = dg.AssetKey(stage)
        self.failed: dict[str, str] = {}
        self.emit_skipped = emit_skipped
        self._queue: queue.Queue[Any] = queue.Queue()
        self.meter = ProgressMeter(stage, total, self.info)

    # --- called from the worker thread -------------------------------------------------------
    def info(self, message: str) -> None:
        self._queue.put(_LogLine("info", message))

    def warning(self, message: str) -> None:
        self._queue.put(_LogLine("warning", message))

    def materialized(self, image_id: str, metadata: dict[str, Any]) -> None:
        self._queue.put(dg.AssetMaterialization(asset_key=self.asset_key, partition=image_id, metadata=metadata))

    def done(self, image_id: str, record: dict[str, Any]) -> None:
        self.materialized(image_id, _record_metadata(self.stage, record))
        self.meter.advance()

    def fail(self, image_id: str, reason: str) -> None:
        self.failed[image_id] = reason
        self.warning(f"{self.stage}: {image_id}: {reason}")
        self.meter.advance()

    def skipped(self, image_ids: Sequence[str]) -> None:
        """Current artefacts Dagster has not recorded yet (e.g. made by an earlier tool) get an event too."""
        for image_id in image_ids:
            if image_id in self.emit_skipped:
                self.materialized(image_id, {"reused": True})

    # --- called from the op's thread ---------------------------------------------------------
    def run(self, context: dg.OpExecutionContext, work: Callable[[], T]) -> Iterator[Any]:
        """Yield the worker's events until ``work`` returns; ``yield from`` gives its result."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = work()
            except BaseException as error:  # re-raised in the op's thread below
                outcome["error"] = error
            finally:
                self._queue.put(_DONE)

        worker = threading.Thread(target=target, name=f"photoset-{self.stage}", daemon=True)
        worker.start()
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, _LogLine):
                getattr(context.log, item.level)(item.message)
            else:
                yield item
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


def run_image_pipeline(
    context: dg.OpExecutionContext,
    image_ids: Sequence[str],
    stages: Collection[str],
    photoset: PhotosetConfig,
    models: ModelResources,
    *,
    force: bool = False,
    sync_options: SyncOptions | None = None,
    unrecorded: dict[str, set[str]] | None = None,
    urls: Mapping[str, str | None] | None = None,
) -> Generator[dg.AssetMaterialization, None, list[StageSummary]]:
    """Run ``stages`` (in pipeline order) over ``image_ids``, yielding one materialization per image
    as it is done; returns one summary per stage (``summaries = yield from run_image_pipeline(...)``).

    ``unrecorded[stage]`` lists ids whose artefact is current but has no Dagster materialization
    yet; they get one so the UI shows the truth (the catch-up job passes it). ``urls`` are the download
    URLs by id (default: the saved photo-list snapshot).
    """
    layout = photoset.layout
    options = sync_options or SyncOptions()
    if options.dry_run:  # reads only: no folders, no lock file
        if APPROVED_LINKS in stages:
            reporter = _Reporter(APPROVED_LINKS, len(image_ids), set())
            summary = yield from reporter.run(
                context, lambda: _sync_stage(list(image_ids), photoset, options, reporter, emit_all=False, urls=urls)
            )
            return [summary]
        return []
    layout.ensure_dirs()
    unrecorded = unrecorded or {}
    summaries: list[StageSummary] = []
    ids = list(image_ids)
    linked: list[str] | None = None  # ids with an approved link, found once the sync stage is done
    # Shared: passes may run side by side; prune takes it exclusively (no resurrected files).
    with data_lock(layout.lock_path, exclusive=False):
        for stage in STAGES:
            if stage not in stages:
                continue
            recorded_missing = unrecorded.get(stage, set())
            if stage == APPROVED_LINKS:
                reporter = _Reporter(stage, len(ids), recorded_missing)
                summary = yield from reporter.run(
                    context, lambda: _sync_stage(ids, photoset, options, reporter, emit_all=not unrecorded, urls=urls)
                )
                summaries.append(summary)
                continue
            if linked is None:
                linked = _with_links(context, layout, ids)
            reporter = _Reporter(stage, len(linked), recorded_missing)
            stage_ids = linked
            result = yield from reporter.run(
                context, lambda: _run_pass(stage, layout, stage_ids, models, force, reporter)
            )
            summaries.append(
                StageSummary(stage, len(result.done), len(result.skipped), dict(result.failed), result.seconds)
            )
            context.log.info(
                f"{stage}: {len(result.done)} done, {len(result.skipped)} current, {len(result.failed)} failed "
                f"in {result.seconds:.1f}s ({result.images_per_s:.2f} images/s)"
            )
    return summaries


def _with_links(context: dg.OpExecutionContext, layout, ids: list[str]) -> list[str]:
    """Later stages only see images in the approved view; the others were reported by the sync."""
    links = scan_approved_links(layout)
    linked = [image_id for image_id in ids if image_id in links]
    if len(linked) < len(ids):
        context.log.warning(
            f"{len(ids) - len(linked)} of {len(ids)} images have no approved link (not downloaded or not an image); "
            "later stages skip them until a sync links them"
        )
    return linked


def _run_pass(stage: str, layout, ids: list[str], models: ModelResources, force: bool, reporter: _Reporter):
    callbacks = {"force": force, "on_done": reporter.done, "on_failed": reporter.fail}
    if stage == IMAGE_FACTS:
        result = passes.run_facts_pass(layout, ids, **callbacks)
    elif stage == CAPTIONS:
        result = passes.run_caption_pass(
            layout,
            ids,
            models.captioner.settings(),
            models.captioner.get,
            input_mode=models.captioner.input_mode,
            **callbacks,
        )
    elif stage == DINOV3:
        result = passes.run_dinov3_pass(layout, ids, models.dinov3.settings(), models.dinov3.get, **callbacks)
    elif stage == VAE:
        result = passes.run_vae_pass(layout, ids, models.flux_vae.settings(), models.flux_vae.get, **callbacks)
    elif stage == T5:
        result = passes.run_t5_pass(layout, ids, models.t5.settings(), models.t5.get, **callbacks)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    reporter.skipped(result.skipped)
    return result


def _sync_stage(
    ids: list[str],
    photoset: PhotosetConfig,
    options: SyncOptions,
    reporter: _Reporter,
    *,
    emit_all: bool,
    urls: Mapping[str, str | None] | None,
) -> StageSummary:
    """Sync the ids; a materialization per linked id (``emit_all``) or, for a catch-up over the whole
    list, only where something changed or Dagster has no record yet (not 60k events a night)."""
    layout = photoset.layout
    if urls is None:
        listing = load_listing(layout.photo_list_path)
        urls = {item.image_id: item.url for item in listing.items} if listing else {}
    items = [PhotoItem(image_id, urls.get(image_id)) for image_id in ids]
    links_before = scan_approved_links(layout)
    complete_before = {i for i in ids if i in links_before and raw_present(layout, i)}
    with photoset.http_client() as client:
        downloader = Downloader(
            client,
            photoset.retry_policy,
            concurrency=photoset.download_concurrency,
            max_bytes=photoset.max_file_bytes,
            allow_http=photoset.allow_http,
        )
        started = time.monotonic()
        stats = sync_images(items, layout, downloader, options, log=reporter.info)
        seconds = time.monotonic() - started
    for line in stats.summary_lines():
        reporter.info(line)
    if not options.dry_run:
        for image_id, ext in stats.linked.items():
            changed = image_id not in complete_before or links_before.get(image_id) != [ext]
            if emit_all or changed or image_id in reporter.emit_skipped:
                reporter.materialized(image_id, {"link": f"approved/{image_id}.{ext}", "ext": ext})
    return StageSummary(
        APPROVED_LINKS,
        done=stats.links_changed + stats.downloaded,
        skipped=stats.symlink_unchanged,
        failed=dict(stats.failures),
        seconds=seconds,
    )


def summaries_metadata(summaries: Sequence[StageSummary], failure_rows: int = 50) -> dict[str, Any]:
    """Run-level metadata: a per-stage table and the failures with their reasons."""
    failures = [(s.stage, image_id, reason) for s in summaries for image_id, reason in s.failed.items()]
    return {
        "stages": markdown_table(
            ("stage", "done", "current", "failed", "seconds", "images/s"),
            [(s.stage, s.done, s.skipped, len(s.failed), f"{s.seconds:.1f}", f"{s.rate:.2f}") for s in summaries],
        ),
        "failed_images": len(failures),
        "failures": markdown_table(("stage", "image_id", "reason"), failures, limit=failure_rows),
    }


def run_observations(summaries: Sequence[StageSummary], failure_rows: int = 50) -> Iterator[dg.AssetObservation]:
    """Per stage, one run-level observation (counts, throughput, failures with reasons), and one per
    failed image on its own partition, so the UI shows why that image is missing."""
    for summary in summaries:
        yield dg.AssetObservation(
            asset_key=dg.AssetKey(summary.stage),
            metadata={
                "run_done": summary.done,
                "run_current": summary.skipped,
                "run_failed": len(summary.failed),
                "run_seconds": round(summary.seconds, 2),
                "run_images_per_s": round(summary.rate, 3),
                "run_failures": markdown_table(("image_id", "reason"), summary.failed.items(), limit=failure_rows),
            },
        )
    for summary in summaries:
        for image_id, reason in summary.failed.items():
            yield dg.AssetObservation(
                asset_key=dg.AssetKey(summary.stage), partition=image_id, metadata={"error": dg.MetadataValue.text(reason)}
            )
