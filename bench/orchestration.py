"""Benchmark what Dagster's orchestration costs at the user's scale (60,000 images), on a
persistent SQLite instance like the default one.

    python bench/orchestration.py [--ids 60000] [--backfill 2000] [--per-image-sample 20]

1. Register 60,000 ids as partitions in one bulk call.
2. Backfill one cheap pass (image_facts) over 2,000 of them as the BackfillPolicy splits it (runs of
   up to 1,000 images), and the same pass called in a plain loop: Dagster's bookkeeping in ms/image.
3. A no-change sensor tick over a 60,000-item list served on loopback.
4. One run per image (Dagster's default for partitioned assets), measured on a sample and
   extrapolated to 60,000 images, against the batched runs: the ratio.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
warnings.filterwarnings("ignore")

import dagster as dg  # noqa: E402
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG  # noqa: E402

from photoset_dagster import passes  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.links import ensure_approved_link  # noqa: E402
from photoset_dagster.definitions import build_definitions  # noqa: E402
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME, MAX_IMAGES_PER_RUN  # noqa: E402
from photoset_dagster.defs.resources import resources_from_env  # noqa: E402
from photoset_dagster.demo.server import PhotoServer  # noqa: E402

PAGE_SIZE = 100


def image_ids(count: int) -> list[str]:
    return [f"img{index:06d}" for index in range(count)]


def write_images(layout: DataLayout, ids: list[str]) -> None:
    layout.ensure_dirs()
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    for image_id in ids:
        layout.raw_path(image_id).write_bytes(buffer.getvalue())
        ensure_approved_link(layout, image_id, "png")


def run_range(defs: dg.Definitions, instance: dg.DagsterInstance, first: str, last: str) -> None:
    key = dg.AssetKey("image_facts")
    job = defs.resolve_implicit_job_def_def_for_assets([key])
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[key],
        tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
        run_config={
            "ops": {"image_pipeline": {"config": {"force": True}}},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        },
    )
    assert result.success


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=60_000)
    parser.add_argument("--backfill", type=int, default=2_000)
    parser.add_argument("--per-image-sample", type=int, default=20)
    args = parser.parse_args()
    runs_per_backfill = math.ceil(args.backfill / MAX_IMAGES_PER_RUN) if MAX_IMAGES_PER_RUN > 0 else 1
    per_run = MAX_IMAGES_PER_RUN if MAX_IMAGES_PER_RUN > 0 else args.backfill

    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test(temp_dir=tmp) as instance:
        ids = image_ids(args.ids)
        layout = DataLayout(Path(tmp) / "data")
        backfill_ids = ids[: args.backfill]
        write_images(layout, backfill_ids)
        defs = build_definitions(resources_from_env({"PHOTOSET_DATA_ROOT": str(layout.root)}))

        started = time.perf_counter()
        instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, ids)
        register_s = time.perf_counter() - started
        print(f"register {args.ids} ids (one add_dynamic_partitions call): {register_s:.2f} s")

        # Plain loop: the pass itself, no Dagster (force: recompute every image).
        started = time.perf_counter()
        passes.run_facts_pass(layout, backfill_ids, force=True)
        loop_s = time.perf_counter() - started

        started = time.perf_counter()
        for start in range(0, args.backfill, per_run):
            chunk = backfill_ids[start : start + per_run]
            run_range(defs, instance, chunk[0], chunk[-1])
        backfill_s = time.perf_counter() - started
        bookkeeping_ms = 1000 * (backfill_s - loop_s) / args.backfill
        print(
            f"backfill image_facts over {args.backfill} images: {runs_per_backfill} run(s) of <= {per_run}, "
            f"{backfill_s:.2f} s (plain loop {loop_s:.2f} s) -> Dagster bookkeeping {bookkeeping_ms:.1f} ms/image"
        )

        sample = backfill_ids[: args.per_image_sample]
        started = time.perf_counter()
        for image_id in sample:
            run_range(defs, instance, image_id, image_id)
        per_image_run_s = (time.perf_counter() - started) / len(sample)
        batched_per_image_s = backfill_s / args.backfill
        print(
            f"one run per image: {per_image_run_s * 1000:.0f} ms/run in-process (sample of {len(sample)}) -> "
            f"{per_image_run_s * args.ids / 3600:.2f} h for {args.ids} images, versus "
            f"{batched_per_image_s * args.ids / 60:.1f} min batched: ratio {per_image_run_s / batched_per_image_s:.0f}x "
            "(the daemon adds ~2.9 s/run more; see README)"
        )

        with PhotoServer() as server:
            items = [{"filename": image_id, "exportable_url": server.file_url(image_id)} for image_id in ids]
            server.set_pages([items[i : i + PAGE_SIZE] for i in range(0, len(items), PAGE_SIZE)])
            sensor_defs = build_definitions(
                resources_from_env(
                    {"PHOTOSET_DATA_ROOT": str(layout.root), "PHOTOSET_PHOTOS_URL": server.photos_url, "PHOTOSET_ALLOW_HTTP": "1"}
                )
            )
            sensor = sensor_defs.resolve_sensor_def("photo_list_sensor")
            resources = {"photoset": sensor_defs.resources["photoset"]}
            first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=resources))
            started = time.perf_counter()
            again = sensor.evaluate_tick(
                dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources)
            )
            tick_s = time.perf_counter() - started
            assert not again.run_requests
            print(f"no-change sensor tick over a {args.ids}-item list ({len(items) // PAGE_SIZE} pages on loopback): {tick_s:.2f} s")
        shutil.rmtree(layout.root, ignore_errors=True)


if __name__ == "__main__":
    main()
