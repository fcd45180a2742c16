"""The per-image stages on a real data layout, with tiny real models loaded by path, driven through the
stage runner (the same code the Dagster assets run)."""

from __future__ import annotations

import base64
import threading
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from photoset_dagster.core import artefacts
from photoset_dagster.core.artefacts import read_json, sha256_file, text_hash
from photoset_dagster.core.buckets import cover_crop, parse_bucket
from photoset_dagster.core.failures import Failure, record_failure
from photoset_dagster.core.images import decode_image
from photoset_dagster.core.layout import PATCHES_DIR, DataLayout
from photoset_dagster.core.lock import DataLock
from photoset_dagster.core.links import ensure_approved_link
from photoset_dagster.models.captioner import CaptionSettings
from photoset_dagster.models.common import LOAD_COUNTS
from photoset_dagster.models.flux_vae import FluxVaeEncoder
from photoset_dagster.stages.base import APPROVED_LINKS, IMAGE_FACTS, ModelStage, Note, Outcome
from photoset_dagster.stages.captions import CaptionsStage
from photoset_dagster.stages.dinov3 import Dinov3Stage
from photoset_dagster.stages.facts import run_facts_stage
from photoset_dagster.stages.pipeline import run_pipeline
from photoset_dagster.stages.runner import run_model_stage
from photoset_dagster.stages.t5 import T5Stage
from photoset_dagster.stages.vae import VaeStage
from photoset_dagster_tests.fixtures_models import CaptionServer, Reply, TinySettings

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}


def add_photo(layout: DataLayout, image_id: str, size: tuple[int, int], seed: int = 0, fmt: str = "PNG") -> Path:
    """A noise photo stored as the sync step leaves it: raw bytes plus the approved link."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    raw = layout.raw_path(image_id)
    Image.fromarray(pixels).save(raw, format=fmt)
    ensure_approved_link(layout, image_id, EXTENSIONS[fmt])
    return raw


def temporaries(layout: DataLayout) -> list[Path]:
    return [path for path in layout.derived_dir.rglob(".*") if path.name.endswith(".tmp")]


class CachingProvider:
    """Loads on first call and counts calls, as the Dagster model resources do."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load = load
        self.calls = 0
        self.model: Any = None

    def __call__(self) -> Any:
        self.calls += 1
        if self.model is None:
            self.model = self.load()
        return self.model


def fail_if_loaded() -> Any:
    raise AssertionError("an all-current stage must not load its model")


@dataclass
class Result:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # current: nothing to do
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "done":
            self.done.append(outcome.image_id)
        elif outcome.status == "current":
            self.skipped.append(outcome.image_id)
        else:
            self.failed[outcome.image_id] = outcome.reason


def collect(outcomes) -> Result:
    result = Result()
    for outcome in outcomes:
        result.add(outcome)
    return result


def run_facts_pass(layout: DataLayout, ids: list[str], force: bool = False) -> Result:
    return collect(run_facts_stage(layout, ids, force=force))


def run_stage(layout: DataLayout, stage: ModelStage[Any], ids: list[str], provider: Callable[[], Any],
              **kwargs: Any) -> Result:
    """Facts first (as the pipeline does), then the model stage over the images whose facts are current."""
    facts = {o.image_id: o.record for o in run_facts_stage(layout, ids) if o.ok}
    failed = {image_id: "not in the approved view (sync it first)" for image_id in ids if image_id not in facts}
    result = collect(run_model_stage(stage, facts, provider, **kwargs))
    result.failed = {**failed, **result.failed}
    return result


# --- facts ----------------------------------------------------------------------------------------


def test_facts_pass_records_reuses_and_reports_failures(layout: DataLayout) -> None:
    raw = add_photo(layout, "wide", (96, 48), fmt="JPEG")
    add_photo(layout, "tall", (48, 96))
    add_photo(layout, "gone", (32, 32))
    layout.raw_path("gone").unlink()
    add_photo(layout, "broken", (32, 32))
    layout.raw_path("broken").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    add_photo(layout, "unlisted", (32, 32))
    (layout.approved_dir / "unlisted.png").unlink()
    result = run_facts_pass(layout, ["wide", "tall", "gone", "broken", "unlisted", "wide"])

    assert result.done == ["wide", "tall"] and result.skipped == []
    failures = result.failed
    assert failures["gone"].startswith("raw file missing")
    assert "cannot decode" in failures["broken"]
    assert failures["unlisted"] == "not in the approved view (sync it first)"
    record = read_json(layout.json_path("facts", "wide"))
    assert record is not None
    stat = raw.stat()
    expected = {"ext": "jpg", "width": 96, "height": 48, "aspect_bucket": "1344x704", "format": "JPEG", "mode": "RGB"}
    assert {key: record[key] for key in expected} == expected and record["frames"] == 1
    assert (record["raw_size"], record["raw_mtime_ns"], record["raw_inode"]) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert record["inputs"] == {"raw_sha256": sha256_file(raw)}

    again = run_facts_pass(layout, ["wide", "tall"])
    assert again.skipped == ["wide", "tall"] and again.done == []

    add_photo(layout, "wide", (48, 96), seed=1, fmt="JPEG")  # the raw file changed: size, mtime, hash
    changed = run_facts_pass(layout, ["wide", "tall"])
    assert changed.done == ["wide"] and changed.skipped == ["tall"]
    updated = read_json(layout.json_path("facts", "wide"))
    assert updated is not None and updated["aspect_bucket"] == "704x1344"
    assert updated["inputs"]["raw_sha256"] != record["inputs"]["raw_sha256"]
    assert run_facts_pass(layout, ["tall"], force=True).done == ["tall"]


def test_facts_of_an_image_whose_sync_failed_say_why_and_are_skipped(layout: DataLayout) -> None:
    layout.ensure_dirs()
    record_failure(layout, Failure("lost", APPROVED_LINKS, "download failed: HTTP 404"))

    (facts,) = run_facts_stage(layout, ["lost"])

    assert (facts.status, facts.reason) == ("skipped", "approved_links failed: download failed: HTTP 404")
    add_photo(layout, "lost", (32, 32))  # synced since (a later sync would also clear the ledger entry)
    (facts,) = run_facts_stage(layout, ["lost"])
    assert facts.status == "done"


def test_a_pass_waiting_for_a_prune_says_who_holds_the_data_and_stops_when_cancelled(layout: DataLayout) -> None:
    layout.ensure_dirs()
    prune = DataLock(layout.lock_path, exclusive=True, what="prune")
    assert prune.try_acquire()
    cancel = threading.Event()
    stream = run_pipeline(layout, [IMAGE_FACTS], ["a"], cancel=cancel)

    note = next(stream)
    assert isinstance(note, Note) and "waiting for the shared data lock, held by prune (exclusive" in note.message
    cancel.set()
    with pytest.raises(InterruptedError):
        next(stream)
    prune.release()


# --- all artefacts at real bucket sizes -----------------------------------------------------------


def test_every_artefact_in_two_real_buckets(layout: DataLayout, tiny_settings: TinySettings) -> None:
    add_photo(layout, "square", (96, 96), seed=1)  # -> 1024x1024
    add_photo(layout, "portrait", (64, 96), seed=2)  # -> 832x1216
    ids = ["square", "portrait"]
    buckets = {"square": (1024, 1024), "portrait": (832, 1216)}

    captions = run_stage(layout, CaptionsStage(layout, tiny_settings.caption), ids, tiny_settings.caption.load)
    assert sorted(captions.done) == sorted(ids), captions.failed
    dinov3_settings = replace(tiny_settings.dinov3, patch_tokens=True)
    dinov3_encoder = dinov3_settings.load()
    assert sorted(run_stage(layout, Dinov3Stage(layout, dinov3_settings), ids, lambda: dinov3_encoder).done) == sorted(ids)
    vae_settings = replace(tiny_settings.vae, input_mode="bucket")
    assert sorted(run_stage(layout, VaeStage(layout, vae_settings), ids, vae_settings.load).done) == sorted(ids)
    t5_encoder = tiny_settings.t5.load()
    assert sorted(run_stage(layout, T5Stage(layout, tiny_settings.t5), ids, lambda: t5_encoder).done) == sorted(ids)

    for image_id, (width, height) in buckets.items():
        facts = read_json(layout.json_path("facts", image_id))
        assert facts is not None and parse_bucket(facts["aspect_bucket"]) == (width, height)
        caption = read_json(layout.json_path("captions", image_id))
        assert caption is not None and caption["caption"] and caption["backend"] == "transformers"
        assert caption["recipe_hash"] == tiny_settings.caption.recipe().hash and caption["input_mode"] == "bucket"

        cls = np.load(layout.npy_path("dinov3", image_id))
        assert cls.shape == (1024,) and cls.dtype == np.float32
        patches = np.load(layout.npy_path(PATCHES_DIR, image_id))
        assert patches.shape == ((width // 16) * (height // 16), 1024) and patches.dtype == np.float32
        assert read_json(layout.json_path("dinov3", image_id))["patches"] is True  # type: ignore[index]

        latent = np.load(layout.npy_path("vae_latents", image_id))
        assert latent.shape == (16, height // 8, width // 8) and latent.dtype == np.float16
        vae_record = read_json(layout.json_path("vae_latents", image_id))
        assert vae_record is not None and vae_record["input_size"] == [width, height]
        assert vae_record["inputs"] == {"raw_sha256": facts["inputs"]["raw_sha256"]}

        hidden = np.load(layout.npy_path("t5_hidden", image_id))
        assert hidden.shape == (77, 1024) and hidden.dtype == np.float16
        t5_record = read_json(layout.json_path("t5_hidden", image_id))
        assert t5_record is not None
        expected_mask = t5_encoder.tokenizer(
            caption["caption"], padding="max_length", max_length=77, truncation=True
        )["attention_mask"]
        assert t5_record["attention_mask"] == expected_mask
        assert t5_record["token_count"] == sum(expected_mask)
        assert t5_record["inputs"] == {"caption_sha256": text_hash(caption["caption"])}

    # The CLS vector embeds the whole image, as Stage 1 did, not the bucket crop (the seed mixed both, B2).
    # (test_models checks the patch slice against the model's own hidden states.)
    portrait = decode_image(layout.raw_path("portrait"))
    with torch.inference_mode():
        whole = dinov3_encoder.model(pixel_values=dinov3_encoder.pixel_values([portrait]))
    stored_cls = np.load(layout.npy_path("dinov3", "portrait"))
    np.testing.assert_allclose(stored_cls, whole.pooler_output[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(stored_cls, dinov3_encoder.embed_cls([cover_crop(portrait, (832, 1216))])[0], atol=1e-3)
    assert temporaries(layout) == []


# --- batching, loads, failures --------------------------------------------------------------------


def test_one_load_per_pass_and_none_when_current(layout: DataLayout, tiny_settings: TinySettings) -> None:
    sizes = [(64, 48), (48, 64), (64, 48), (32, 32), (64, 48), (48, 64), (64, 48)]
    ids = [f"img{i}" for i in range(len(sizes))]
    for seed, (image_id, size) in enumerate(zip(ids, sizes)):
        add_photo(layout, image_id, size, seed=seed)
    settings = replace(tiny_settings.vae, batch_size=2)
    batch_sizes: list[tuple[int, tuple[int, int]]] = []

    def load_recording_batches() -> FluxVaeEncoder:
        encoder = settings.load()
        real_encode = encoder.encode

        def recording_encode(images: list[Image.Image], **kwargs: Any) -> np.ndarray:
            batch_sizes.append((len(images), images[0].size))
            return real_encode(images, **kwargs)

        encoder.encode = recording_encode  # type: ignore[method-assign]
        return encoder

    loads_before = LOAD_COUNTS["flux_vae"]
    provider = CachingProvider(load_recording_batches)

    result = run_stage(layout, VaeStage(layout, settings), ids, provider)

    assert sorted(result.done) == sorted(ids) and result.failed == {}
    assert provider.calls == 1 and LOAD_COUNTS["flux_vae"] == loads_before + 1
    # Batches hold one input size each ("original" mode: the image's own size) and at most batch_size.
    assert batch_sizes == [(2, (64, 48)), (2, (64, 48)), (2, (48, 64)), (1, (32, 32))]
    for image_id, (width, height) in zip(ids, sizes):
        assert np.load(layout.npy_path("vae_latents", image_id)).shape == (16, height // 8, width // 8)

    rerun = run_stage(layout, VaeStage(layout, settings), ids, fail_if_loaded)
    assert rerun.skipped == ids and rerun.done == []
    assert LOAD_COUNTS["flux_vae"] == loads_before + 1


def test_per_image_failures_do_not_stop_the_pass(layout: DataLayout, tiny_settings: TinySettings) -> None:
    add_photo(layout, "good", (64, 48), seed=1)
    add_photo(layout, "corrupt", (64, 48), seed=2)
    add_photo(layout, "also-good", (64, 48), seed=3)
    ids = ["good", "corrupt", "also-good", "never-synced"]
    assert run_facts_pass(layout, ids).done == ["good", "corrupt", "also-good"]
    # Corrupted after its facts were taken (the facts stay current: same size, same mtime).
    raw = layout.raw_path("corrupt")
    stat = raw.stat()
    content = raw.read_bytes()
    raw.write_bytes(content[:40] + b"\x00" * (len(content) - 40))
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    result = run_stage(layout, Dinov3Stage(layout, tiny_settings.dinov3), ids, tiny_settings.dinov3.load)

    failed = result.failed
    assert sorted(result.done) == ["also-good", "good"]
    assert set(failed) == {"corrupt", "never-synced"}
    assert "cannot decode" in failed["corrupt"] and failed["never-synced"] == "not in the approved view (sync it first)"
    assert not layout.npy_path("dinov3", "corrupt").exists()
    assert not layout.npy_path(PATCHES_DIR, "good").exists()  # patch tokens are off by default


def test_killed_pass_resumes_without_corrupt_files(
    layout: DataLayout, tiny_settings: TinySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"photo{i}" for i in range(6)]
    for seed, image_id in enumerate(ids):
        add_photo(layout, image_id, (32, 32), seed=seed)
    settings = replace(tiny_settings.vae, batch_size=2)
    encoder = settings.load()

    class Killed(Exception):
        pass

    committed: list[str] = []
    stage = VaeStage(layout, settings)
    facts = {o.image_id: o.record for o in run_facts_stage(layout, ids)}

    with pytest.raises(Killed):
        for outcome in run_model_stage(stage, facts, lambda: encoder):
            committed.append(outcome.image_id)
            if len(committed) == 3:
                raise Killed
    finished = [image_id for image_id in ids if layout.json_path("vae_latents", image_id).exists()]
    assert finished == committed and temporaries(layout) == []

    # A crash between an npy and its sidecar (the commit marker) leaves that image stale, not "done".
    real_write_json = artefacts.atomic_write_json

    def crash_on_photo4_sidecar(path: Path, obj: Any, fsync: bool = True) -> None:
        if path == layout.json_path("vae_latents", "photo4"):
            raise OSError("disk vanished")
        real_write_json(path, obj, fsync)

    monkeypatch.setattr(artefacts, "atomic_write_json", crash_on_photo4_sidecar)
    partial = run_stage(layout, stage, ids, lambda: encoder)
    assert partial.skipped == committed and partial.failed == {"photo4": "OSError: disk vanished"}
    assert layout.npy_path("vae_latents", "photo4").exists() and not layout.json_path("vae_latents", "photo4").exists()

    monkeypatch.setattr(artefacts, "atomic_write_json", real_write_json)
    resumed = run_stage(layout, stage, ids, lambda: encoder)
    assert resumed.done == ["photo4"] and resumed.failed == {}
    for image_id in ids:
        assert np.load(layout.npy_path("vae_latents", image_id)).shape == (16, 4, 4)
        assert read_json(layout.json_path("vae_latents", image_id)) is not None
    assert temporaries(layout) == []


# --- staleness: recipes and captions --------------------------------------------------------------


def _caption_by_width(request: Any) -> Reply:
    """Caption text from the sent image's width; 48 px wide images get an empty answer."""
    width = Image.open(io.BytesIO(base64.b64decode(request.body["images"][0]))).width
    return Reply(body={"response": "" if width == 48 else f"A photo {width} pixels wide."})


def test_caption_and_t5_staleness(
    layout: DataLayout, tiny_settings: TinySettings, caption_server: CaptionServer
) -> None:
    add_photo(layout, "a", (64, 64), seed=1)
    add_photo(layout, "b", (80, 64), seed=2)
    add_photo(layout, "c", (48, 64), seed=3)
    ids = ["a", "b", "c"]
    caption_server.default = _caption_by_width
    captions = CaptionSettings(backend="ollama", ollama_host=caption_server.url, retry_backoff_s=0.01)

    first = run_stage(layout, CaptionsStage(layout, captions, "original"), ids, captions.load)
    assert sorted(first.done) == ["a", "b"] and first.failed == {"c": "CaptionError: empty caption"}
    assert not layout.json_path("captions", "c").exists()  # an empty caption is never stored
    record = read_json(layout.json_path("captions", "a"))
    assert record is not None and record["caption"] == "A photo 64 pixels wide." and record["backend"] == "ollama"
    assert run_stage(layout, CaptionsStage(layout, captions, "original"), ids[:2], fail_if_loaded).skipped == ["a", "b"]

    t5 = tiny_settings.t5
    encoder = t5.load()
    encoded = run_stage(layout, T5Stage(layout, t5), ids, lambda: encoder)
    assert encoded.done == ["a", "b"] and encoded.failed == {"c": "no caption yet (run the captions stage first)"}
    assert run_stage(layout, T5Stage(layout, t5), ["a", "b"], fail_if_loaded).skipped == ["a", "b"]

    # A recipe change (max_length) makes every hidden state stale.
    short = replace(t5, max_length=32)
    short_encoder = short.load()
    redone = run_stage(layout, T5Stage(layout, short), ["a", "b"], lambda: short_encoder)
    assert redone.done == ["a", "b"]
    assert np.load(layout.npy_path("t5_hidden", "a")).shape == (32, 1024)
    assert len(read_json(layout.json_path("t5_hidden", "a"))["attention_mask"]) == 32  # type: ignore[index]

    # A new prompt re-captions everything; only a caption whose text changed makes its T5 stale.
    caption_server.default = lambda request: (
        Reply(body={"response": "A photo of a square."})
        if Image.open(io.BytesIO(base64.b64decode(request.body["images"][0]))).width == 64
        else _caption_by_width(request)
    )
    reworded = replace(captions, prompt="Describe the photo.")
    assert sorted(run_stage(layout, CaptionsStage(layout, reworded, "original"), ["a", "b"], reworded.load).done) == ["a", "b"]
    after = run_stage(layout, T5Stage(layout, short), ["a", "b"], lambda: short_encoder)
    assert after.done == ["a"] and after.skipped == ["b"]
    t5_record = read_json(layout.json_path("t5_hidden", "a"))
    assert t5_record is not None and t5_record["inputs"] == {"caption_sha256": text_hash("A photo of a square.")}


def test_caption_for_an_older_raw_file_is_not_encoded(layout: DataLayout, tiny_settings: TinySettings) -> None:
    add_photo(layout, "a", (64, 64), seed=1)
    run_facts_pass(layout, ["a"])
    facts = read_json(layout.json_path("facts", "a"))
    assert facts is not None
    artefacts.write_json_artefact(
        layout, "captions", "a", body={"caption": "A photo.", "backend": "ollama"}, recipe=None,
        inputs={"raw_sha256": "0" * 64},
    )  # fmt: skip
    result = run_stage(layout, T5Stage(layout, tiny_settings.t5), ["a"], fail_if_loaded)
    assert "older raw file" in result.failed["a"]

