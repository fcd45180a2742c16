"""Dataset JSONL builder at scale: a cold build, an unchanged rebuild, and an incremental one.

Synthesises N ready images (facts, captions and the three sidecars shaped exactly like the pipeline's,
with seed-length captions and 77-token masks; the raw files and ``.npy`` files are empty placeholders
whose size and mtime the records prove, because the builder checks each file with one stat and reads
none of them), then times ``build_dataset_jsonl``: cold (no cache), unchanged,
after re-captioning ``--changed`` images (new caption + T5 sidecar, written by atomic rename), and
unchanged again right after that change and once the changed folders have settled.

    .venv/bin/python bench/dataset.py --images 60000 --changed 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photoset_dagster.core.artefacts import Recipe, text_hash  # noqa: E402
from photoset_dagster.core.atomic import atomic_write_json  # noqa: E402
from photoset_dagster.core.buckets import BUCKET_NAMES, parse_bucket  # noqa: E402
from photoset_dagster.core.dataset import build_dataset_jsonl  # noqa: E402
from photoset_dagster.core.layout import NPY_KINDS, DataLayout  # noqa: E402

RECIPES = {
    "captions": Recipe("captions", {"backend": "ollama", "model": "gemma3:27b", "prompt_sha": "0f1e2d3c"}),
    "dinov3": Recipe("dinov3", {"model": "facebook/dinov3-vitl16-pretrain-lvd1689m", "patches": True}),
    "vae_latents": Recipe("vae_latents", {"model": "black-forest-labs/FLUX.1-dev", "dtype": "float16"}),
    "t5_hidden": Recipe("t5_hidden", {"model": "t5-large", "max_length": 77, "dtype": "float16"}),
}
T5_ROWS = 77
CAPTION = (
    "A woman in a red knee-length dress stands on a stone pier, weight on her left leg, right hand resting on "
    "a rusted railing, left arm relaxed at her side. Overcast daylight gives soft, even illumination without "
    "hard shadows. Behind her a grey harbour with moored fishing boats and low hills. Full-body framing, "
    "subject centred, camera at chest height, slight three-quarter angle from her right. Image {n}."
)


def _write(path: Path, record: dict) -> None:
    # Plain unsynced writes: the bench measures the builder, not how fast its input tree can be made durable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(record, ensure_ascii=False, sort_keys=True).encode())
    finally:
        os.close(fd)


def _provenance(image_id: str, kind: str, inputs: dict) -> dict:
    recipe = RECIPES[kind]
    return {"image_id": image_id, "kind": kind, "recipe": recipe.as_dict(), "recipe_hash": recipe.hash,
            "inputs": inputs, "created_at": "2026-01-01T00:00:00+00:00"}


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _empty_file(path: Path) -> os.stat_result:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    return os.stat(path)


def _npy_proof(layout: DataLayout, kind: str, image_id: str) -> dict:
    """The proof a sidecar carries of its (here empty) ``.npy``, as write_npy_artefact records it."""
    stat = os.stat(layout.npy_path(kind, image_id))
    return {"npy_size": stat.st_size, "npy_mtime_ns": stat.st_mtime_ns, "npy_sha256": EMPTY_SHA256}


def write_caption_and_t5(layout: DataLayout, image_id: str, raw_sha256: str, caption: str, atomic: bool) -> None:
    tokens = 20 + len(caption) % 50
    mask = [1] * tokens + [0] * (T5_ROWS - tokens)
    caption_record = {
        **_provenance(image_id, "captions", {"raw_sha256": raw_sha256}), "caption": caption, "backend": "ollama"
    }
    t5_record = {**_provenance(image_id, "t5_hidden", {"caption_sha256": text_hash(caption)}),
                 "shape": [T5_ROWS, 1024], "dtype": "float16", "attention_mask": mask, "token_count": tokens,
                 **_npy_proof(layout, "t5_hidden", image_id)}
    if atomic:  # as the pipeline does: a new inode, so the builder's cache sees the change
        atomic_write_json(layout.json_path("captions", image_id), caption_record, fsync=False)
        atomic_write_json(layout.json_path("t5_hidden", image_id), t5_record, fsync=False)
    else:
        _write(layout.json_path("captions", image_id), caption_record)
        _write(layout.json_path("t5_hidden", image_id), t5_record)


def synthesise(layout: DataLayout, images: int) -> list[str]:
    ids = [f"{n:07d}q{n * 7919 % 100003:05d}xyzabcdefghijk" for n in range(images)]  # 28 chars, like the seed's
    for n, image_id in enumerate(ids):
        bucket = BUCKET_NAMES[n % len(BUCKET_NAMES)]
        width, height = parse_bucket(bucket)
        raw_sha256 = f"{n:064x}"
        raw = _empty_file(layout.raw_path(image_id))
        for kind in NPY_KINDS:
            _empty_file(layout.npy_path(kind, image_id))
        _write(layout.json_path("facts", image_id), {
            "image_id": image_id, "kind": "facts", "ext": "jpg", "width": width, "height": height,
            "aspect_bucket": bucket, "format": "JPEG", "mode": "RGB", "frames": 1, "raw_size": raw.st_size,
            "raw_mtime_ns": raw.st_mtime_ns, "raw_inode": raw.st_ino, "inputs": {"raw_sha256": raw_sha256},
            "created_at": "2026-01-01T00:00:00+00:00",
        })
        write_caption_and_t5(layout, image_id, raw_sha256, CAPTION.format(n=n), atomic=False)
        _write(layout.json_path("dinov3", image_id), {
            **_provenance(image_id, "dinov3", {"raw_sha256": raw_sha256}), "shape": [1024], "dtype": "float32",
            "patches": True, **_npy_proof(layout, "dinov3", image_id),
        })
        _write(layout.json_path("vae_latents", image_id), {
            **_provenance(image_id, "vae_latents", {"raw_sha256": raw_sha256}),
            "shape": [16, height // 8, width // 8], "dtype": "float16", "input_size": [width, height],
            **_npy_proof(layout, "vae_latents", image_id),
        })
    return ids


def timed_build(layout: DataLayout, ids: list[str], label: str) -> None:
    started, cpu_started = time.perf_counter(), time.process_time()
    report = build_dataset_jsonl(layout, ids, RECIPES)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{label:<32} {seconds:6.2f}s wall {cpu:6.2f}s cpu  records={report.records} "
          f"files_read={report.files_read} not_ready={sum(report.not_ready.values())} "
          f"jsonl={report.bytes / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to synthesise (default: a temp dir)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average before: {load:.1f} on {os.cpu_count()} cores (wall times include other processes' load)")

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        layout = DataLayout(Path(work) / "data")
        layout.ensure_dirs()
        started = time.perf_counter()
        ids = synthesise(layout, args.images)
        os.sync()
        print(f"synthesised {args.images} images ({args.images * (1 + len(NPY_KINDS) + 5)} files) in {time.perf_counter() - started:.1f}s")

        # The builder trusts a folder's mtime only once it is 2 s old (see core.dataset._SETTLE_NS): let the
        # synthesis settle, as the passes would have finished a while before a rebuild.
        time.sleep(2.5)
        timed_build(layout, ids, "cold build (no cache)")
        timed_build(layout, ids, "unchanged rebuild")
        step = max(1, len(ids) // args.changed)
        for n, image_id in enumerate(ids[::step][: args.changed]):
            revised = CAPTION.format(n=f"{n * step} (revised)")
            write_caption_and_t5(layout, image_id, f"{n * step:064x}", revised, atomic=True)
        timed_build(layout, ids, f"incremental ({args.changed} changed)")
        timed_build(layout, ids, "unchanged, <2 s after the change")  # the two changed folders listed again
        time.sleep(2.5)
        timed_build(layout, ids, "unchanged, settled")


if __name__ == "__main__":
    main()
