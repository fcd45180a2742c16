"""The one rule that turns stage outcomes into Dagster events, used by every path (asset selection,
backfill, catch-up, CLI), so the UI says the same thing whichever way the work was started:

* **done** -> a per-partition materialization carrying the stage's code version (its recipe hash),
  a data version (the artefact's content hash), the input provenance Dagster's staleness needs, and
  a little per-image metadata; plus a passing ``artefact_valid`` evaluation on that partition.
* **current** but never recorded in Dagster (made by an earlier tool, imported from Stage 1) -> the
  same, marked ``reused``.
* **failed / skipped** -> the partition is planned in this run and not materialized, so when the run
  ends failed the UI shows it **Failed**; a failing ``artefact_valid`` evaluation on the partition
  carries the reason, visible on the partition itself.
* the run's outcome: a run with failed images ends failed (unless ``tolerate_failures``), with
  per-stage counts in images and a table of failed images.

Events are written in batches (``DAGSTER_EVENT_BATCH_SIZE``; one storage round trip per batch where
the storage supports it) and flushed at least every second, so the UI follows a long stage.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    NULL_EVENT_POINTER,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventBatchMetadata,
    DagsterEventType,
    generate_event_batch_id,
)
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from sqlalchemy import select

from ..core.progress import ProgressMeter
from ..stages.base import (
    APPROVED_LINKS,
    CAPTIONS,
    IMAGE_FACTS,
    T5,
    UPSTREAM,
    Note,
    Outcome,
    StageDone,
    data_version,
)
from .metadata import markdown_table

CHECK_NAME = "artefact_valid"
FLUSH_EVERY = 256
FLUSH_AFTER_S = 1.0
MAX_CAPTION_PREVIEW = 400
FAILURE_ROWS = 50
# Dagster writes events that carry batch metadata in one storage call per batch; the batch size
# must be at least ours, or it would cut our batches itself.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", str(FLUSH_EVERY))


def image_metadata(stage: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Small, useful per-image metadata (what a person checks when clicking one partition)."""
    if stage == APPROVED_LINKS:
        return {"link": record.get("link", ""), "ext": record.get("ext", "")}
    if stage == IMAGE_FACTS:
        keys = ("width", "height", "aspect_bucket", "format", "mode", "frames", "color_profile")
        return {k: record[k] for k in keys if record.get(k) is not None}
    if stage == CAPTIONS:
        caption = record.get("caption", "")
        return {"caption": dg.MetadataValue.text(caption[:MAX_CAPTION_PREVIEW]), "words": len(caption.split())}
    meta: dict[str, Any] = {"shape": str(tuple(record.get("shape", ()))), "dtype": record.get("dtype", "")}
    if stage == T5:
        meta["token_count"] = record.get("token_count", 0)
    return meta


def _input_version(stage: str, record: Mapping[str, Any]) -> str | None:
    """The data version of the upstream artefact this one was made from, read off its own record."""
    inputs = record.get("inputs") or {}
    if stage == T5:
        return inputs.get("caption_sha256")
    if stage == IMAGE_FACTS:
        return data_version(APPROVED_LINKS, record)
    return inputs.get("raw_sha256")


@dataclass
class RunSummary:
    """What the run did, per stage and per image."""

    stages: list[StageDone] = field(default_factory=list)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # image id -> (stage, reason) of the first
    images: int = 0

    def metadata(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "failed_images": len(self.failed),
            "stages": markdown_table(
                ("stage", "done", "current", "failed or skipped", "seconds", "images/s", "figures"),
                [(s.stage, s.done, s.current, len(s.failed), f"{s.seconds:.1f}", f"{s.rate:.2f}",
                  ", ".join(f"{name} {value}" for name, value in s.stats.items())) for s in self.stages],
            ),
            "failures": markdown_table(
                ("image_id", "stage", "reason"),
                [(image_id, stage, reason) for image_id, (stage, reason) in self.failed.items()],
                limit=FAILURE_ROWS,
            ),
        }

    def failure_message(self) -> str:
        stages = sorted({stage for stage, _ in self.failed.values()})
        first = next(iter(self.failed.items()))
        return (
            f"{len(self.failed)} of {self.images} image(s) failed ({', '.join(stages)}); "
            f"e.g. {first[0]}: {first[1][1]}. Each reason is on the image's partition and in the run metadata; "
            "the next run retries them"
        )


class Recorder:
    """Writes one run's outcomes to Dagster (see the module docstring for the rule)."""

    def __init__(
        self,
        context: dg.OpExecutionContext,
        code_versions: Mapping[str, str | None],
        *,
        image_count: int,
        dry_run: bool = False,
        checked_stages: Collection[str] = (),
    ) -> None:
        self.context = context
        self.instance = context.instance
        # The step's own context: events built against it are attributed to this step, exactly as
        # if the op had yielded them, and can carry batch metadata.
        self._step = context._step_execution_context  # noqa: SLF001
        self.code_versions = code_versions
        self.dry_run = dry_run
        self.checked_stages = set(checked_stages)
        self.summary = RunSummary(images=image_count)
        self._recorded: dict[str, set[str]] = {}
        self._pointers: dict[str, str] = {}
        self._pending: list[Outcome] = []
        self._last_flush = time.monotonic()
        self._meters: dict[str, ProgressMeter] = {}
        # Check evaluations go in batches only to a storage that says it takes them (photoset's event
        # logs); Dagster's Postgres storage rejects them in a batch and falls back to one write each.
        self._batch_checks = bool(getattr(self.instance.event_log_storage, "batches_check_evaluations", False))

    # --- the stream ----------------------------------------------------------------------------
    def record(self, item: Outcome | Note | StageDone) -> Iterator[DagsterEvent]:
        if isinstance(item, Note):
            getattr(self.context.log, item.level)(item.message)
            return
        if isinstance(item, StageDone):
            yield from self.flush()
            self.summary.stages.append(item)
            self.context.log.info(
                f"{item.stage}: {item.done} {'would be done' if self.dry_run else 'done'}, {item.current} current, "
                f"{len(item.failed)} failed or skipped "
                f"in {item.seconds:.1f}s ({item.rate:.2f} images/s)"
            )
            yield from self._stage_observation(item)
            return
        self._meter(item.stage).advance()
        if not item.ok:
            self.summary.failed.setdefault(item.image_id, (item.stage, item.reason))
            if item.status == "failed":
                self.context.log.warning(f"{item.stage}: {item.image_id}: {item.reason}")
        if self.dry_run:
            return
        self._pending.append(item)
        if len(self._pending) >= FLUSH_EVERY or time.monotonic() - self._last_flush >= FLUSH_AFTER_S:
            yield from self.flush()

    def flush(self) -> Iterator[DagsterEvent]:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        materialized: list[dg.AssetMaterialization] = []
        planned: list[AssetMaterializationPlannedData] = []
        for outcome in pending:
            if outcome.ok:
                if outcome.status == "current" and outcome.image_id in self._recorded_partitions(outcome.stage):
                    continue  # recorded before: its check still passes (below), on that materialization
                assert outcome.record is not None
                materialized.append(self._materialization(outcome, reused=outcome.status == "current"))
            else:
                planned.append(AssetMaterializationPlannedData(dg.AssetKey(outcome.stage), partition=outcome.image_id))
        yield from self._batch(materialized, lambda mat, meta: DagsterEvent.asset_materialization(self._step, mat, meta))
        yield from self._batch(planned, lambda data, meta: DagsterEvent.from_step(
            DagsterEventType.ASSET_MATERIALIZATION_PLANNED, self._step, data,
            message=f"{data.asset_key.to_user_string()} {data.partition}: planned, not materialized",
            batch_metadata=meta))
        # After the materializations are stored: each evaluation names the one it judged.
        checked = [outcome for outcome in pending if outcome.stage in self.checked_stages]
        yield from self._batch(self._check_evaluations(checked), lambda evaluation, meta: DagsterEvent.from_step(
            DagsterEventType.ASSET_CHECK_EVALUATION, self._step, evaluation,
            message=f"{evaluation.asset_key.to_user_string()} {evaluation.partition}: {CHECK_NAME} "
                    + ("passed" if evaluation.passed else f"failed: {evaluation.description}"),
            batch_metadata=meta if self._batch_checks else None))

    def _check_evaluations(self, outcomes: Sequence[Outcome]) -> list[dg.AssetCheckEvaluation]:
        """One ``artefact_valid`` evaluation per outcome, targeting the partition's latest materialization
        (the one just written, the one recorded before, or an older one a failure now contradicts):
        Dagster shows a partition's check result only while it targets the latest materialization."""
        evaluations = []
        for stage in dict.fromkeys(outcome.stage for outcome in outcomes):
            key = dg.AssetKey(stage)
            partitions = {outcome.image_id for outcome in outcomes if outcome.stage == stage}
            targets = self._latest_materializations(key, partitions)
            for outcome in outcomes:
                if outcome.stage != stage:
                    continue
                target = targets.get(outcome.image_id)
                if outcome.ok:
                    evaluations.append(dg.AssetCheckEvaluation(key, CHECK_NAME, True, partition=outcome.image_id,
                                                               target_materialization_data=target))
                else:
                    evaluations.append(dg.AssetCheckEvaluation(
                        key, CHECK_NAME, False, partition=outcome.image_id, description=outcome.reason,
                        metadata={"reason": dg.MetadataValue.text(outcome.reason), "status": outcome.status},
                        target_materialization_data=target,
                    ))
        return evaluations

    def _latest_materializations(
        self, key: dg.AssetKey, partitions: Collection[str]
    ) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
        """partition -> its latest materialization (id, run, time). From a SQL event log, three columns of
        the events' rows: Dagster's ``fetch_materializations`` would deserialize every event, most of
        what an evaluation costs."""
        storage = self.instance.event_log_storage
        latest = storage.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION, partitions)
        if not latest:
            return {}
        if isinstance(storage, SqlEventLogStorage):
            table = SqlEventLogStorageTable
            with storage.index_connection() as conn:
                rows = conn.execute(select(table.c.id, table.c.run_id, table.c.timestamp)
                                    .where(table.c.id.in_(latest.values()))).all()
            found = {storage_id: (run_id, stored_at.replace(tzinfo=timezone.utc).timestamp())
                     for storage_id, run_id, stored_at in rows}
        else:
            records = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, storage_ids=list(latest.values())), limit=len(latest)).records
            found = {record.storage_id: (record.run_id, record.timestamp) for record in records}
        return {partition: AssetCheckEvaluationTargetMaterializationData(
                    storage_id=storage_id, run_id=found[storage_id][0], timestamp=found[storage_id][1])
                for partition, storage_id in latest.items() if storage_id in found}

    def _batch(self, items: Sequence[Any], build: Callable[[Any, DagsterEventBatchMetadata], DagsterEvent]):
        batch_id = generate_event_batch_id()
        for index, item in enumerate(items):
            yield build(item, DagsterEventBatchMetadata(batch_id, index == len(items) - 1))

    # --- one event ---------------------------------------------------------------------------------
    def _materialization(self, outcome: Outcome, *, reused: bool) -> dg.AssetMaterialization:
        record = outcome.record or {}
        metadata = image_metadata(outcome.stage, record)
        if reused:
            metadata["reused"] = True
        tags: dict[str, str] = {}
        code_version = self.code_versions.get(outcome.stage)
        if code_version is not None:
            tags[CODE_VERSION_TAG] = code_version
        version = data_version(outcome.stage, record)
        if version is not None:
            tags[DATA_VERSION_TAG] = version
            tags[DATA_VERSION_IS_USER_PROVIDED_TAG] = "true"
        upstream = UPSTREAM.get(outcome.stage)
        if upstream is not None and code_version is not None:
            upstream_key = dg.AssetKey(upstream)
            tags[get_input_data_version_tag(upstream_key)] = _input_version(outcome.stage, record) or "UNKNOWN"
            tags[get_input_event_pointer_tag(upstream_key)] = self._pointer(upstream)
        return dg.AssetMaterialization(asset_key=outcome.stage, partition=outcome.image_id, metadata=metadata,
                                       tags=tags)

    def _pointer(self, upstream: str) -> str:
        """The newest storage id of ``upstream``'s materializations when this stage's events are written
        (the upstream stage has been flushed by then): Dagster's staleness looks for upstream
        materializations after it to tell whether an input changed since."""
        if upstream not in self._pointers:
            records = self.instance.fetch_materializations(dg.AssetKey(upstream), limit=1).records
            self._pointers[upstream] = str(records[0].storage_id) if records else NULL_EVENT_POINTER
        return self._pointers[upstream]

    def _recorded_partitions(self, stage: str) -> set[str]:
        if stage not in self._recorded:
            self._recorded[stage] = set(self.instance.get_materialized_partitions(dg.AssetKey(stage)))
        return self._recorded[stage]

    def _meter(self, stage: str) -> ProgressMeter:
        if stage not in self._meters:
            self._meters[stage] = ProgressMeter(stage, self.summary.images, self.context.log.info)
        return self._meters[stage]

    def _stage_observation(self, done: StageDone) -> Iterator[DagsterEvent]:
        """Run-level figures of one stage on its asset (unpartitioned), for the asset's page."""
        if self.dry_run:
            return
        metadata: dict[str, Any] = {
            "run_done": done.done,
            "run_current": done.current,
            "run_failed": len(done.failed),
            "run_seconds": round(done.seconds, 2),
            "run_images_per_s": round(done.rate, 3),
            "run_failures": markdown_table(("image_id", "reason"), done.failed.items(), limit=FAILURE_ROWS),
            **{f"run_{name}": value for name, value in done.stats.items() if isinstance(value, (int, float, str))},
        }
        observation = dg.AssetObservation(asset_key=done.stage, metadata=metadata)
        yield DagsterEvent.asset_observation(self._step, observation)

    # --- the end of the run ------------------------------------------------------------------------
    def finish(self, *, tolerate_failures: bool) -> Iterator[DagsterEvent]:
        """Flush, then fail the step (and so the run) when images failed, unless tolerated."""
        yield from self.flush()
        if self.summary.failed and not tolerate_failures and not self.dry_run:
            raise dg.Failure(description=self.summary.failure_message(), metadata=self.summary.metadata())


_END = object()


def stream_in_worker(
    produce: Callable[[threading.Event, Callable[[Any], None]], Iterator[Any]], name: str
) -> Iterator[Any]:
    """Run the ``produce(cancel, emit)`` generator in a worker thread and yield its items here; ``emit``
    lets code deep in the worker (a wait for a slot) send an item (a Note) without a generator.

    Dagster persists an event only when the op's thread hands it over, and its storage is not for
    concurrent writers: so the stages work (decode, download, model) in the worker while this thread
    writes the events of images already done. If this thread is interrupted (Ctrl-C, SIGTERM, a
    failed event write), ``cancel`` is set and the worker stops at its next image.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=4 * FLUSH_EVERY)
    cancel = threading.Event()
    failure: list[BaseException] = []

    def emit(item: Any) -> None:
        while True:  # never block forever on a consumer that is gone
            try:
                items.put(item, timeout=0.5)
                return
            except queue.Full:
                if cancel.is_set():
                    return

    def target() -> None:
        try:
            for item in produce(cancel, emit):
                emit(item)
                if cancel.is_set():
                    return
        except BaseException as error:  # re-raised in the op's thread below
            failure.append(error)
        finally:
            while True:
                try:
                    items.put(_END, timeout=0.5)
                    break
                except queue.Full:
                    if cancel.is_set():
                        break

    worker = threading.Thread(target=target, name=f"photoset-{name}", daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not _END:
            yield item
    finally:
        cancel.set()
        worker.join()
    if failure:
        raise failure[0]
