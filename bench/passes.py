"""Benchmark the four model passes with tiny models: the Dagster range run against the same core
and model functions called in a plain loop, in the same process.

    python bench/passes.py [--images 200]

Both sides start from the same synced raw files (copied), use the same settings and load each model
once. Printed: images/s per pass (plain loop), model loads of the Dagster run, both wall times and
their ratio, i.e. what Dagster's bookkeeping costs on top of the work. VAE input is "original"
(small images) because bucket-size VAE encodes on a 2-core CPU would swamp everything else.
"""

from __future__ import annotations

import argparse
import io
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
warnings.filterwarnings("ignore")

import dagster as dg  # noqa: E402
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG  # noqa: E402

from photoset_dagster import passes  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.links import ensure_approved_link  # noqa: E402
from photoset_dagster.definitions import build_definitions  # noqa: E402
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME  # noqa: E402
from photoset_dagster.defs.pipeline import MODEL_STAGES, STAGES  # noqa: E402
from photoset_dagster.defs.resources import resources_from_env  # noqa: E402
from photoset_dagster.demo.tiny_models import build_tiny_models  # noqa: E402
from photoset_dagster.models.common import LOAD_COUNTS  # noqa: E402

SIZES = ((64, 64), (48, 64), (64, 48), (48, 80), (80, 48), (48, 96), (96, 48))


def write_images(layout: DataLayout, count: int) -> list[str]:
    layout.ensure_dirs()
    ids = []
    for index in range(count):
        image_id = f"bench{index:05d}"
        width, height = SIZES[index % len(SIZES)]
        pixels = np.random.default_rng(index).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        layout.raw_path(image_id).write_bytes(buffer.getvalue())
        ensure_approved_link(layout, image_id, "png")
        ids.append(image_id)
    return ids


def plain_loop(resources: dict, layout: DataLayout, ids: list[str]) -> dict[str, float]:
    """The same pass functions and model loaders, no Dagster."""
    seconds = {}
    started = time.perf_counter()
    passes.run_facts_pass(layout, ids)
    seconds["image_facts"] = time.perf_counter() - started
    calls = {
        "captions": lambda: passes.run_caption_pass(
            layout, ids, resources["captioner"].settings(), resources["captioner"].settings().load, input_mode="original"
        ),
        "dinov3_embeddings": lambda: passes.run_dinov3_pass(
            layout, ids, resources["dinov3"].settings(), resources["dinov3"].settings().load
        ),
        "vae_latents": lambda: passes.run_vae_pass(
            layout, ids, resources["flux_vae"].settings(), resources["flux_vae"].settings().load
        ),
        "t5_hidden": lambda: passes.run_t5_pass(layout, ids, resources["t5"].settings(), resources["t5"].settings().load),
    }
    for stage in MODEL_STAGES:
        started = time.perf_counter()
        result = calls[stage]()
        seconds[stage] = time.perf_counter() - started
        assert not result.failed, result.failed
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = build_tiny_models(tmp_path / "models")
        env = {
            "PHOTOSET_DEVICE": "cpu",
            "PHOTOSET_DINOV3_MODEL": str(models.dinov3),
            "PHOTOSET_CAPTION_MODEL": str(models.gemma),
            "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "8",
            "PHOTOSET_VAE_MODEL": str(models.flux),
            "PHOTOSET_VAE_INPUT_MODE": "original",
            "PHOTOSET_T5_MODEL": str(models.t5),
        }
        source = DataLayout(tmp_path / "source")
        ids = write_images(source, args.images)
        loop_layout, dagster_layout = DataLayout(tmp_path / "loop"), DataLayout(tmp_path / "dagster")
        for layout in (loop_layout, dagster_layout):
            shutil.copytree(source.root, layout.root, symlinks=True)

        env_loop = {**env, "PHOTOSET_DATA_ROOT": str(loop_layout.root)}
        env_dagster = {**env, "PHOTOSET_DATA_ROOT": str(dagster_layout.root)}
        loop_resources = resources_from_env(env_loop)
        print(f"{args.images} images, tiny models, CPU; VAE input 'original'")

        started = time.perf_counter()
        loop_seconds = plain_loop(loop_resources, loop_layout, ids)
        loop_total = time.perf_counter() - started

        defs = build_definitions(resources_from_env(env_dagster))
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, ids)
            keys = [dg.AssetKey(stage) for stage in STAGES[1:]]
            job = defs.resolve_implicit_job_def_def_for_assets(keys)
            before = dict(LOAD_COUNTS)
            started = time.perf_counter()
            result = job.execute_in_process(
                instance=instance,
                asset_selection=keys,
                tags={ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]},
            )
            dagster_total = time.perf_counter() - started
            assert result.success
            loads = {family: LOAD_COUNTS[family] - before.get(family, 0) for family in ("captioner", "dinov3", "flux_vae", "t5")}

        print("\nplain loop, per pass:")
        for stage, seconds in loop_seconds.items():
            print(f"  {stage:<18} {seconds:7.2f} s  {args.images / seconds:8.2f} images/s")
        print(f"\nmodel loads in the Dagster run: {loads}")
        print(f"plain loop total:   {loop_total:7.2f} s")
        print(f"Dagster run total:  {dagster_total:7.2f} s  (one run, {args.images} partitions x {len(keys)} assets)")
        print(f"ratio Dagster/loop: {dagster_total / loop_total:7.2f} x")
        print(f"Dagster overhead:   {1000 * (dagster_total - loop_total) / args.images:7.1f} ms per image (all passes)")


if __name__ == "__main__":
    main()
