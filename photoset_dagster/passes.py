"""The per-image work behind each asset: facts, captions, DINOv3, Flux VAE latents, T5 hidden states.

Every pass follows one shape:

1. make sure each image has current facts (decoded size, bucket, raw hash); computed on demand;
2. skip images whose artefact is current (same recipe hash, same inputs) unless ``force``;
3. load the model only if something is left (the caller's provider caches it across calls);
4. batch what is left by model input size, decode the next batches in a small thread pool while the
   model works on the current one, and write each artefact atomically with its provenance record last.

A failure is per image, with a reason (missing raw, decode error, caption error, non-finite output):
it is reported through ``on_failed`` and in the result, and the pass carries on. A pass killed
mid-way leaves only complete artefacts (atomic files, sidecar last), so re-running it finishes the rest.
A model that cannot load is not an image failure: its ModelLoadError propagates.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np

from .core.artefacts import (
    npy_staleness,
    read_json,
    sha256_file,
    staleness,
    text_hash,
    write_json_artefact,
    write_npy_artefact,
)
from .core.atomic import save_npy_atomic
from .core.buckets import original_size
from .core.images import decode_image, model_input, read_facts
from .core.layout import PATCHES_DIR, DataLayout
from .core.links import scan_approved_links_for
from .core.lock import data_lock

if TYPE_CHECKING:
    from PIL import Image

    from .models.captioner import Captioner, CaptionSettings
    from .models.dinov3 import Dinov3Encoder, Dinov3Settings
    from .models.flux_vae import FluxVaeEncoder, FluxVaeSettings
    from .models.t5 import T5Settings, T5TextEncoder

OnDone = Callable[[str, dict[str, Any]], None]
OnFailed = Callable[[str, str], None]
InputMode = Literal["bucket", "original"]
ModelT = TypeVar("ModelT")

# Decoding threads: Pillow releases the GIL while decoding and resizing, so threads scale; a 12 MP
# JPEG takes ~0.25 s to decode and bucket-crop on one core here, and a GPU pass wants tens of images a second.
DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
# Default pixel cap for "original"-mode model inputs (core.images.model_input's default).
ORIGINAL_MAX_PIXELS = 4 * 1024 * 1024


@dataclass
class PassResult:
    kind: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images computed per second of the whole call (skips and failures cost time, not throughput)."""
        return len(self.done) / self.seconds if self.seconds > 0 else 0.0


class _ImageFailure(Exception):
    """One image cannot be processed by this pass; the message is the reason."""


# --- facts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    record: dict[str, Any]
    computed: bool


def run_facts_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    *,
    force: bool = False,
    on_done: OnDone | None = None,
    on_failed: OnFailed | None = None,
) -> PassResult:
    """Decode each approved image once and record its facts (size after EXIF, bucket, format, raw hash)."""
    progress = _Progress("facts", on_done, on_failed)
    with data_lock(layout.lock_path, exclusive=False), _facts_for(layout, image_ids, force=force) as outcomes:
        for image_id, outcome in outcomes:
            if isinstance(outcome, _ImageFailure):
                progress.fail(image_id, str(outcome))
            elif outcome.computed:
                progress.done(image_id, outcome.record)
            else:
                progress.skip(image_id)
    return progress.finish()


def _facts_for(layout: DataLayout, image_ids: Iterable[str], *, force: bool) -> _OrderedMap:
    """Current facts (or the failure) for each distinct id, in order; missing or outdated ones are
    computed in parallel. Use as a context manager."""
    unique_ids = list(dict.fromkeys(image_ids))
    return _OrderedMap(lambda image_id: _ensure_facts(layout, image_id, force), unique_ids)


def _ensure_facts(layout: DataLayout, image_id: str, force: bool) -> _Facts:
    """The image's facts record, recomputed when forced or when the raw file's size or mtime changed."""
    extensions = scan_approved_links_for(layout, image_id)
    if not extensions:
        raise _ImageFailure("not in the approved view")
    ext = extensions[0]
    raw = layout.raw_path(image_id)
    try:
        stat = os.stat(raw)
    except FileNotFoundError:
        raise _ImageFailure(f"raw file missing: {raw}") from None
    record = None if force else read_json(layout.json_path("facts", image_id))
    if (
        record is not None
        and record.get("ext") == ext
        and record.get("raw_size") == stat.st_size
        and record.get("raw_mtime_ns") == stat.st_mtime_ns
    ):
        return _Facts(record, computed=False)
    facts = read_facts(raw)
    body = {
        "ext": ext,
        "width": facts.width,
        "height": facts.height,
        "aspect_bucket": facts.aspect_bucket,
        "format": facts.format,
        "mode": facts.mode,
        "frames": facts.frames,
        "raw_size": stat.st_size,
        "raw_mtime_ns": stat.st_mtime_ns,
    }
    inputs = {"raw_sha256": sha256_file(raw)}
    record = write_json_artefact(layout, "facts", image_id, body=body, recipe=None, inputs=inputs)
    return _Facts(record, computed=True)


# --- model passes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One image that needs this pass's artefact (re)computed."""

    image_id: str
    facts: dict[str, Any]
    caption: str = ""  # the text to encode (t5 only)

    @property
    def raw_inputs(self) -> dict[str, str]:
        return {"raw_sha256": self.facts["inputs"]["raw_sha256"]}


@dataclass(frozen=True)
class _ModelPass(Generic[ModelT]):
    """How one pass plans, prepares, computes and stores; the runner supplies everything else."""

    kind: str
    batch_size: int
    # The image's job and whether its artefact is already current; raises _ImageFailure.
    plan: Callable[[str, dict[str, Any]], tuple[_Job, bool]]
    # Key of a batch: images of one key stack into one tensor.
    group: Callable[[_Job], Hashable]
    # CPU work in a decoding thread (decode, crop, resize).
    prepare: Callable[[_Job], Any]
    # One output per job, in order; an Exception instance marks that image failed.
    compute: Callable[[ModelT, list[_Job], list[Any]], Sequence[Any]]
    # Commits the artefact, returns its record.
    write: Callable[[_Job, Any], dict[str, Any]]


def run_caption_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    settings: CaptionSettings,
    captioner: Callable[[], Captioner],
    *,
    input_mode: InputMode = "bucket",
    force: bool = False,
    on_done: OnDone | None = None,
    on_failed: OnFailed | None = None,
) -> PassResult:
    recipe = settings.recipe()

    def plan(image_id: str, facts: dict[str, Any]) -> tuple[_Job, bool]:
        job = _Job(image_id, facts)
        record = read_json(layout.json_path("captions", image_id))
        return job, staleness(record, recipe.hash, job.raw_inputs) is None and bool(record and record.get("caption"))

    def write(job: _Job, caption: str) -> dict[str, Any]:
        body = {"caption": caption, "backend": settings.backend, "input_mode": input_mode}
        return write_json_artefact(layout, "captions", job.image_id, body=body, recipe=recipe, inputs=job.raw_inputs)

    spec: _ModelPass[Captioner] = _ModelPass(
        kind="captions",
        batch_size=settings.batch_size,
        plan=plan,
        group=lambda job: _input_group(job.facts, input_mode, ORIGINAL_MAX_PIXELS),
        prepare=lambda job: _model_image(layout, job, input_mode, ORIGINAL_MAX_PIXELS),
        compute=lambda model, jobs, images: model.caption(images),
        write=write,
    )
    return _run_model_pass(layout, image_ids, spec, captioner, force, on_done, on_failed)


def run_dinov3_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    settings: Dinov3Settings,
    encoder: Callable[[], Dinov3Encoder],
    *,
    force: bool = False,
    on_done: OnDone | None = None,
    on_failed: OnFailed | None = None,
) -> PassResult:
    """CLS of the full image (as Stage 1 did) and, with ``patch_tokens``, patch tokens of the bucket crop."""
    recipe = settings.recipe()
    with_patches = settings.patch_tokens

    def plan(image_id: str, facts: dict[str, Any]) -> tuple[_Job, bool]:
        job = _Job(image_id, facts)
        current = npy_staleness(layout, "dinov3", image_id, recipe.hash, job.raw_inputs) is None
        return job, current and (not with_patches or layout.npy_path(PATCHES_DIR, image_id).is_file())

    def prepare(job: _Job) -> tuple[Image.Image, Image.Image | None]:
        image = decode_image(layout.raw_path(job.image_id))
        return image, model_input(image, job.facts["aspect_bucket"], mode="bucket") if with_patches else None

    def compute(model: Dinov3Encoder, jobs: list[_Job], inputs: list[tuple[Any, Any]]) -> list[Any]:
        cls = model.embed_cls([full for full, _ in inputs])
        patches = model.embed_patches([crop for _, crop in inputs]) if with_patches else [None] * len(jobs)
        return list(zip(cls, patches))

    def write(job: _Job, output: tuple[np.ndarray, np.ndarray | None]) -> dict[str, Any]:
        cls, patches = output
        if patches is not None:
            if not np.isfinite(patches).all():
                raise ValueError(f"dinov3 patches for {job.image_id} have non-finite values; not stored")
            # Before the CLS sidecar, which commits both: a crash in between leaves the image stale.
            save_npy_atomic(layout.npy_path(PATCHES_DIR, job.image_id), patches)
        return write_npy_artefact(
            layout, "dinov3", job.image_id, cls, recipe, job.raw_inputs, extra={"patches": with_patches}
        )

    spec: _ModelPass[Dinov3Encoder] = _ModelPass(
        kind="dinov3",
        batch_size=settings.batch_size,
        plan=plan,
        group=lambda job: job.facts["aspect_bucket"],
        prepare=prepare,
        compute=compute,
        write=write,
    )
    return _run_model_pass(layout, image_ids, spec, encoder, force, on_done, on_failed)


def run_vae_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    settings: FluxVaeSettings,
    encoder: Callable[[], FluxVaeEncoder],
    *,
    force: bool = False,
    on_done: OnDone | None = None,
    on_failed: OnFailed | None = None,
) -> PassResult:
    recipe = settings.recipe()

    def plan(image_id: str, facts: dict[str, Any]) -> tuple[_Job, bool]:
        job = _Job(image_id, facts)
        return job, npy_staleness(layout, "vae_latents", image_id, recipe.hash, job.raw_inputs) is None

    def compute(model: FluxVaeEncoder, jobs: list[_Job], images: list[Image.Image]) -> list[Any]:
        latents = model.encode(images, image_ids=[job.image_id for job in jobs])
        return [(latent, image.size) for latent, image in zip(latents, images)]

    def write(job: _Job, output: tuple[np.ndarray, tuple[int, int]]) -> dict[str, Any]:
        latent, (width, height) = output
        return write_npy_artefact(
            layout, "vae_latents", job.image_id, latent, recipe, job.raw_inputs, extra={"input_size": [width, height]}
        )

    spec: _ModelPass[FluxVaeEncoder] = _ModelPass(
        kind="vae_latents",
        batch_size=settings.batch_size,
        plan=plan,
        group=lambda job: _input_group(job.facts, settings.input_mode, settings.max_pixels),
        prepare=lambda job: _model_image(layout, job, settings.input_mode, settings.max_pixels),
        compute=compute,
        write=write,
    )
    return _run_model_pass(layout, image_ids, spec, encoder, force, on_done, on_failed)


def run_t5_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    settings: T5Settings,
    encoder: Callable[[], T5TextEncoder],
    *,
    force: bool = False,
    on_done: OnDone | None = None,
    on_failed: OnFailed | None = None,
) -> PassResult:
    """Encode each image's caption; a new caption (different text hash) makes the old states stale."""
    recipe = settings.recipe()

    def plan(image_id: str, facts: dict[str, Any]) -> tuple[_Job, bool]:
        record = read_json(layout.json_path("captions", image_id)) or {}
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption:
            raise _ImageFailure("no caption yet")
        job = _Job(image_id, facts, caption=caption)
        if (record.get("inputs") or {}).get("raw_sha256") != job.raw_inputs["raw_sha256"]:
            raise _ImageFailure("no caption yet for the current raw file (the caption describes an older file)")
        return job, npy_staleness(layout, "t5_hidden", image_id, recipe.hash, _caption_inputs(job)) is None

    def compute(model: T5TextEncoder, jobs: list[_Job], captions: list[str]) -> list[Any]:
        hidden, masks = model.encode(captions)
        return list(zip(hidden, masks))

    def write(job: _Job, output: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        hidden, mask = output
        extra = {"attention_mask": mask.tolist(), "token_count": int(mask.sum())}
        return write_npy_artefact(layout, "t5_hidden", job.image_id, hidden, recipe, _caption_inputs(job), extra=extra)

    spec: _ModelPass[T5TextEncoder] = _ModelPass(
        kind="t5_hidden",
        batch_size=settings.batch_size,
        plan=plan,
        group=lambda job: "text",  # every caption pads to max_length, so any captions stack
        prepare=lambda job: job.caption,
        compute=compute,
        write=write,
    )
    return _run_model_pass(layout, image_ids, spec, encoder, force, on_done, on_failed)


def _caption_inputs(job: _Job) -> dict[str, str]:
    return {"caption_sha256": text_hash(job.caption)}


def _input_group(facts: dict[str, Any], mode: InputMode, max_pixels: int) -> str:
    """The model input size an image will have: its bucket, or its own rounded size in "original" mode."""
    if mode == "bucket":
        return facts["aspect_bucket"]
    width, height = original_size(facts["width"], facts["height"], 16, max_pixels)
    return f"{width}x{height}"


def _model_image(layout: DataLayout, job: _Job, mode: InputMode, max_pixels: int) -> Image.Image:
    image = decode_image(layout.raw_path(job.image_id))
    return model_input(image, job.facts["aspect_bucket"], mode=mode, max_pixels=max_pixels)


def _run_model_pass(
    layout: DataLayout,
    image_ids: Iterable[str],
    spec: _ModelPass[ModelT],
    provider: Callable[[], ModelT],
    force: bool,
    on_done: OnDone | None,
    on_failed: OnFailed | None,
) -> PassResult:
    progress = _Progress(spec.kind, on_done, on_failed)
    with data_lock(layout.lock_path, exclusive=False):
        jobs = _plan_jobs(layout, image_ids, spec, force, progress)
        if jobs:
            model = provider()  # only now: an all-current run loads nothing
            batches = _batches(jobs, spec.group, spec.batch_size)
            flat = [job for batch in batches for job in batch]
            # Decode the batch after the one in the model while the model works.
            lookahead = 2 * max(len(batch) for batch in batches)
            with _OrderedMap(spec.prepare, flat, window=lookahead) as prepared:
                for batch in batches:
                    _run_batch(spec, model, [next(prepared) for _ in batch], progress)
    return progress.finish()


def _plan_jobs(
    layout: DataLayout, image_ids: Iterable[str], spec: _ModelPass[Any], force: bool, progress: _Progress
) -> list[_Job]:
    """The jobs left to do; current images are recorded as skipped, unusable ones as failed."""
    jobs: list[_Job] = []
    with _facts_for(layout, image_ids, force=False) as outcomes:
        for image_id, facts in outcomes:
            if isinstance(facts, _ImageFailure):
                progress.fail(image_id, str(facts))
                continue
            try:
                job, current = spec.plan(image_id, facts.record)
            except _ImageFailure as exc:
                progress.fail(image_id, str(exc))
                continue
            if current and not force:
                progress.skip(image_id)
            else:
                jobs.append(job)
    return jobs


def _run_batch(spec: _ModelPass[ModelT], model: ModelT, batch: list[tuple[_Job, Any]], progress: _Progress) -> None:
    ready = []
    for job, prepared in batch:
        if isinstance(prepared, _ImageFailure):
            progress.fail(job.image_id, str(prepared))
        else:
            ready.append((job, prepared))
    for (job, _), output in zip(ready, _compute_isolating(spec, model, ready)):
        if isinstance(output, Exception):
            progress.fail(job.image_id, _reason(output))
            continue
        try:
            record = spec.write(job, output)
        except (ValueError, OSError) as exc:  # non-finite output, disk trouble
            progress.fail(job.image_id, _reason(exc))
            continue
        progress.done(job.image_id, record)


def _batches(jobs: list[_Job], group: Callable[[_Job], Hashable], batch_size: int) -> list[list[_Job]]:
    """Jobs grouped by input size (groups in first-seen order), cut into batches of ``batch_size``."""
    groups: dict[Hashable, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(group(job), []).append(job)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def _compute_isolating(spec: _ModelPass[ModelT], model: ModelT, ready: list[tuple[_Job, Any]]) -> list[Any]:
    """Outputs for a batch; if the batch raises, each image is retried alone so one bad image (or a
    batch too large for memory) fails only itself."""
    if not ready:
        return []
    jobs = [job for job, _ in ready]
    try:
        outputs = list(spec.compute(model, jobs, [prepared for _, prepared in ready]))
    except Exception as exc:  # any model error becomes that image's failure reason
        if len(ready) == 1:
            return [exc]
        return [_compute_isolating(spec, model, [item])[0] for item in ready]
    if len(outputs) != len(ready):
        raise RuntimeError(f"{spec.kind}: the model returned {len(outputs)} outputs for {len(ready)} images")
    return outputs


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _ImageFailure) else f"{type(exc).__name__}: {exc}"


class _OrderedMap:
    """``fn`` over ``items`` in a thread pool, results in input order, at most ``window`` in flight.

    Yields ``(item, result)``: the result, or an _ImageFailure carrying the reason the call raised.
    A context manager, so leaving early (an exception from a callback) cancels what is queued.
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
        except _ImageFailure as exc:
            return item, exc
        except Exception as exc:  # decode errors, missing files, invalid ids: all per-image reasons
            return item, _ImageFailure(_reason(exc))


class _Progress:
    """Collects the result and calls the caller's callbacks as each image settles."""

    def __init__(self, kind: str, on_done: OnDone | None, on_failed: OnFailed | None) -> None:
        self.result = PassResult(kind)
        self._on_done = on_done
        self._on_failed = on_failed
        self._started = time.perf_counter()

    def done(self, image_id: str, record: dict[str, Any]) -> None:
        self.result.done.append(image_id)
        if self._on_done is not None:
            self._on_done(image_id, record)

    def skip(self, image_id: str) -> None:
        self.result.skipped.append(image_id)

    def fail(self, image_id: str, reason: str) -> None:
        self.result.failed[image_id] = reason
        if self._on_failed is not None:
            self._on_failed(image_id, reason)

    def finish(self) -> PassResult:
        self.result.seconds = time.perf_counter() - self._started
        return self.result
