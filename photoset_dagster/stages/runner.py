"""Drives a model stage over many images: plan, batch by input size, decode ahead, compute, write.

The model is asked for only when something needs computing (an all-current run loads nothing).
Batches of one input size are prepared in a small thread pool while the model works on the batch
before (Pillow releases the GIL while decoding and resizing). A batch that raises is retried image by
image, so one bad image — or a batch too large for memory — fails only itself. A stage whose model
can stream (an HTTP captioner keeping dozens of requests in flight) is fed continuously instead of
batch by batch. Every image settles as exactly one :class:`Outcome`, yielded as soon as it is known.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .base import ImageFailure, Job, ModelStage, Outcome

ModelT = TypeVar("ModelT")
# Decoding threads: a 12 MP JPEG takes ~0.25 s to decode and bucket-crop on one core, and a GPU
# stage wants tens of images a second.
DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))


class Cancelled(Exception):
    """The run was interrupted; the stage stopped between images."""


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("interrupted")


def reason_of(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ImageFailure) else f"{type(exc).__name__}: {exc}"


def run_model_stage(
    stage: ModelStage[ModelT],
    facts: Mapping[str, Mapping[str, Any]],
    provider: Callable[[], ModelT],
    *,
    force: bool = False,
    cancel: threading.Event | None = None,
    preflight: Callable[[int], None] | None = None,
) -> Iterator[Outcome]:
    """Outcomes for every image in ``facts`` (id -> current facts record, in order). ``preflight`` hears
    the bytes the stage is about to write before anything is loaded or written (and may refuse)."""
    jobs: list[Job] = []
    for image_id, record in facts.items():
        check_cancel(cancel)
        try:
            job, current = stage.plan(image_id, record)
        except ImageFailure as exc:
            yield Outcome(stage.name, image_id, "failed", reason=str(exc))
            continue
        if current is not None and not force:
            yield Outcome(stage.name, image_id, "current", record=current)
        else:
            jobs.append(job)
    if not jobs:
        return
    if preflight is not None:
        preflight(len(jobs) * stage.bytes_per_image())
    model = provider()  # only now: an all-current stage loads nothing
    batches = _batches(jobs, stage.group, stage.batch_size)
    flat = [job for batch in batches for job in batch]
    # Decode the batch after the one in the model while the model works.
    lookahead = 2 * max(len(batch) for batch in batches)
    with OrderedMap(stage.prepare, flat, window=lookahead) as prepared:
        if stage.streams(model):
            yield from _run_streaming(stage, model, prepared, cancel)
            return
        for batch in batches:
            check_cancel(cancel)
            yield from _run_batch(stage, model, [next(prepared) for _ in batch])


def _run_streaming(
    stage: ModelStage[ModelT], model: ModelT, prepared: Iterator[tuple[Job, Any]], cancel: threading.Event | None
) -> Iterator[Outcome]:
    """Feed a streaming model continuously; images that failed to decode settle on the way."""
    decode_failures: deque[Outcome] = deque()

    def ready() -> Iterator[tuple[Job, Any]]:
        for job, item in prepared:
            check_cancel(cancel)
            if isinstance(item, ImageFailure):
                decode_failures.append(Outcome(stage.name, job.image_id, "failed", reason=str(item)))
            else:
                yield job, item

    for job, output in stage.stream(model, ready()):
        while decode_failures:
            yield decode_failures.popleft()
        yield _write_one(stage, job, output)
    yield from decode_failures


def _run_batch(stage: ModelStage[ModelT], model: ModelT, batch: list[tuple[Job, Any]]) -> Iterator[Outcome]:
    ready = []
    for job, prepared in batch:
        if isinstance(prepared, ImageFailure):
            yield Outcome(stage.name, job.image_id, "failed", reason=str(prepared))
        else:
            ready.append((job, prepared))
    for (job, _), output in zip(ready, compute_isolating(stage, model, ready)):
        yield _write_one(stage, job, output)


def _write_one(stage: ModelStage[Any], job: Job, output: Any) -> Outcome:
    if isinstance(output, BaseException):
        return Outcome(stage.name, job.image_id, "failed", reason=reason_of(output))
    try:
        record = stage.write(job, output)
    except (ValueError, OSError) as exc:  # non-finite output, disk trouble
        return Outcome(stage.name, job.image_id, "failed", reason=reason_of(exc))
    return Outcome(stage.name, job.image_id, "done", record=record)


def _batches(jobs: list[Job], group: Callable[[Job], Hashable], batch_size: int) -> list[list[Job]]:
    """Jobs grouped by input size (groups in first-seen order), cut into batches of ``batch_size``."""
    groups: dict[Hashable, list[Job]] = {}
    for job in jobs:
        groups.setdefault(group(job), []).append(job)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def compute_isolating(stage: ModelStage[ModelT], model: ModelT, ready: list[tuple[Job, Any]]) -> list[Any]:
    """Outputs for a batch; if the batch raises (a bad image, out of memory), each image is retried
    alone so only the images that fail alone are failed."""
    if not ready:
        return []
    jobs = [job for job, _ in ready]
    try:
        outputs = list(stage.compute(model, jobs, [prepared for _, prepared in ready]))
    except Exception as exc:  # any model error becomes that image's failure reason
        if len(ready) == 1:
            return [exc]
        return [compute_isolating(stage, model, [item])[0] for item in ready]
    if len(outputs) != len(ready):
        raise RuntimeError(f"{stage.name}: the model returned {len(outputs)} outputs for {len(ready)} images")
    return outputs


class OrderedMap:
    """``fn`` over ``items`` in a thread pool, results in input order, at most ``window`` in flight.

    Yields ``(item, result)``: the result, or an ImageFailure carrying the reason the call raised.
    A context manager, so leaving early (an exception, an interrupt) cancels what is queued.
    """

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any], *, window: int | None = None) -> None:
        self._fn = fn
        self._items = items
        self._window = max(window or 0, 2 * DECODE_WORKERS)
        self._pool = ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="photoset-prepare")
        self._pending: deque[tuple[Any, Future[Any]]] = deque()

    def __enter__(self) -> Iterator[tuple[Any, Any]]:
        return self._results()

    def __exit__(self, *exc_info: object) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _results(self) -> Iterator[tuple[Any, Any]]:
        for item in self._items:
            self._pending.append((item, self._pool.submit(self._fn, item)))
            if len(self._pending) >= self._window:
                yield self._next()
        while self._pending:
            yield self._next()

    def _next(self) -> tuple[Any, Any]:
        item, future = self._pending.popleft()
        try:
            return item, future.result()
        except ImageFailure as exc:
            return item, exc
        except Exception as exc:  # decode errors, missing files, invalid ids: all per-image reasons
            return item, ImageFailure(reason_of(exc))
