#!/usr/bin/env python3
"""Captions at server speed: photoset's captions stage against a loopback server that batches like vLLM.

The server (photoset_dagster.demo.caption_server) decodes every request in flight together under a
tokens/s ceiling, as vLLM does on a GPU. A client that keeps too few requests in flight, or waits for
a whole batch before sending more, gets well below the ceiling. Target: photoset reaches >= 90 % of it.
Exits 1 when it does not.

  python bench/captions_server.py                     # 600 bucket-size photos, concurrency 64: ~35 s
  python bench/captions_server.py --concurrency 4     # the old default, for comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.links import ensure_approved_link  # noqa: E402
from photoset_dagster.demo.caption_server import ContinuousBatchingServer, EngineModel  # noqa: E402
from photoset_dagster.models.captioner import CaptionSettings  # noqa: E402
from photoset_dagster.stages.base import CAPTIONS, Outcome  # noqa: E402
from photoset_dagster.stages.captions import CaptionsStage  # noqa: E402
from photoset_dagster.stages.pipeline import ModelWork, run_pipeline  # noqa: E402

TARGET = 0.90
DISTINCT_PHOTOS = 40  # generated once each, then cycled: encoding 400 photos would take longer than the run


def caption_photos(layout: DataLayout, ids: Sequence[str], settings: CaptionSettings) -> dict[str, Any]:
    """The system under test: photoset's captions stage over ``ids`` (facts first), as a run does it:
    decode and bucket-crop in worker threads ahead of the captioner, stream requests, write each
    caption artefact atomically. Returns the captioner's stats and the failures."""
    captioner = settings.load()
    work = ModelWork(CaptionsStage(layout, settings), lambda: captioner)
    failures = {}
    for item in run_pipeline(layout, [CAPTIONS], ids, models={CAPTIONS: work}):
        if isinstance(item, Outcome) and not item.ok:
            failures[item.image_id] = item.reason
    return {**captioner.stats(), "failures": failures}


def make_photos(layout: DataLayout, count: int, size: int) -> list[str]:
    """``count`` synced square JPEGs (smooth content like a photo, quality 90) at a bucket's size; the
    same bytes repeat every DISTINCT_PHOTOS (encoding them all would take longer than the run)."""
    layout.ensure_dirs()
    bodies = []
    for index in range(DISTINCT_PHOTOS):
        small = Image.fromarray(np.random.default_rng(index).integers(0, 256, (12, 12, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        bodies.append(buffer.getvalue())
    ids = []
    for index in range(count):
        image_id = f"photo{index:05d}"
        layout.raw_path(image_id).write_bytes(bodies[index % DISTINCT_PHOTOS])
        ensure_approved_link(layout, image_id, "jpg")
        ids.append(image_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    engine = EngineModel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=CaptionSettings.concurrency)
    parser.add_argument("--ceiling", type=float, default=engine.ceiling_tokens_per_s, help="server tokens/s")
    parser.add_argument("--size", type=int, default=1024, help="photo side in pixels (the 1024x1024 bucket)")
    args = parser.parse_args(argv)
    engine = dataclasses.replace(engine, ceiling_tokens_per_s=args.ceiling)

    with tempfile.TemporaryDirectory() as folder, ContinuousBatchingServer(engine) as server:
        layout = DataLayout(Path(folder))
        ids = make_photos(layout, args.images, args.size)
        settings = CaptionSettings(backend="openai", openai_base_url=server.url, concurrency=args.concurrency)
        print(
            f"server: ceiling {engine.ceiling_tokens_per_s:g} tokens/s, step {engine.step_s * 1000:g} ms "
            f"(+{engine.step_growth_s * 1000:g} ms per request), prefill {engine.prefill_s * 1000:g} ms, "
            f"captions {engine.min_tokens}-{engine.max_tokens} tokens",
            flush=True,
        )
        started = time.perf_counter()
        stats = caption_photos(layout, ids, settings)
        seconds = time.perf_counter() - started
        served = server.stats()

    ratio = stats["tokens_per_s"] / engine.ceiling_tokens_per_s
    met = ratio >= TARGET
    print(f"photoset: {args.images} photos of {args.size}x{args.size}, concurrency {args.concurrency}, {seconds:.1f} s")
    print(f"  tokens/s   {stats['tokens_per_s']:8.0f}   {ratio:.1%} of the ceiling (target >= {TARGET:.0%}: "
          f"{'met' if met else 'NOT met'})")  # fmt: skip
    print(f"  images/s   {stats['images_per_s']:8.1f}")
    print(f"  in flight  max {stats['max_in_flight']}, mean {stats['mean_in_flight']}")
    print(f"  requests {stats['requests']}, retries {stats['retries']}, failed {stats['failed']}")
    for key, reason in list(stats["failures"].items())[:3]:
        print(f"    photo {key}: {reason}")
    print(f"server: max {served.max_running} decoding at once, mean {served.mean_running}, "
          f"{served.tokens_per_s:.0f} tokens/s over its busy {served.busy_s:.1f} s")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
