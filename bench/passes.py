"""Benchmark what Dagster costs on top of the model passes: one Dagster run over a partition range
(the user's `dagster asset materialize --partition-range`, on photoset's default SQLite instance in a
fresh DAGSTER_HOME) against the same stages driven by a plain loop, in the same process.

    python bench/passes.py [--images 300] [--size 256] [--repeats 3]

Both sides start from fresh copies of the same synced photos (``--size`` px on the long side, seven aspect
ratios), use the same tiny random-weight models of the real classes on the CPU and load each model
once. The loop is the core with nothing around it: ``run_pipeline`` over facts, captions, DINOv3,
VAE and T5. The Dagster run adds the recorder (a materialization per image and asset with code and
data versions, batched), the run lease, planned events and the checks. Printed: per-stage seconds
and images/s of the loop, the two medians, the ratio (the median of each repeat's back-to-back pair;
target: at most 1.10) and the bookkeeping in ms per image per asset.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
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
warnings.filterwarnings("ignore")

import dagster as dg  # noqa: E402
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG  # noqa: E402

from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.links import ensure_approved_link  # noqa: E402
from photoset_dagster.definitions import build_definitions  # noqa: E402
from photoset_dagster.defs.execution import ModelResources  # noqa: E402
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME  # noqa: E402
from photoset_dagster.defs.resources import resources_from_env  # noqa: E402
from photoset_dagster.demo.tiny_models import build_tiny_models  # noqa: E402
from photoset_dagster.instance import prepare_dagster_home  # noqa: E402
from photoset_dagster.models.common import LOAD_COUNTS  # noqa: E402
from photoset_dagster.stages.base import IMAGE_FACTS, MODEL_STAGES, Outcome, StageDone  # noqa: E402
from photoset_dagster.stages.pipeline import ModelWork, run_pipeline  # noqa: E402

ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))
ASSETS = [IMAGE_FACTS, *MODEL_STAGES]


def write_photos(layout: DataLayout, count: int, long_side: int) -> list[str]:
    layout.ensure_dirs()
    ids = []
    for index in range(count):
        image_id = f"bench{index:05d}"
        wide, tall = ASPECTS[index % len(ASPECTS)]
        scale = long_side / max(wide, tall)
        pixels = np.random.default_rng(index).integers(0, 256, size=(round(tall * scale), round(wide * scale), 3),
                                                       dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        layout.raw_path(image_id).write_bytes(buffer.getvalue())
        ensure_approved_link(layout, image_id, "jpg")
        ids.append(image_id)
    return ids


def plain_loop(resources: dict, layout: DataLayout, ids: list[str]) -> dict[str, float]:
    """The same stages, models and settings through the core's pipeline, nothing recorded."""
    models = ModelResources(resources["dinov3"], resources["captioner"], resources["flux_vae"], resources["t5"])
    works = {stage: ModelWork(models.stage(stage, layout), lambda stage=stage: models.for_stage(stage).get("cpu"))
             for stage in MODEL_STAGES}
    seconds = {}
    for item in run_pipeline(layout, MODEL_STAGES, ids, models=works):
        if isinstance(item, Outcome) and not item.ok:
            raise SystemExit(f"the loop failed {item.stage} for {item.image_id}: {item.reason}")
        if isinstance(item, StageDone):
            seconds[item.stage] = item.seconds
    return seconds


def dagster_run(resources: dict, ids: list[str], home: Path) -> float:
    """One run of the image assets over the range, on photoset's default instance in ``home``."""
    os.environ["DAGSTER_HOME"] = str(home)  # photoset's event log finds its files through it
    prepare_dagster_home()
    defs = build_definitions(resources)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, ids)
        keys = [dg.AssetKey(name) for name in ASSETS]
        job = defs.resolve_implicit_job_def_def_for_assets(keys)
        started = time.perf_counter()
        result = job.execute_in_process(
            instance=instance, asset_selection=keys, raise_on_error=False,
            tags={ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]},
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        seconds = time.perf_counter() - started
        if not result.success:
            raise SystemExit("the Dagster run failed")
        recorded = sum(
            len(instance.get_materialized_partitions(key)) for key in keys
        )
        if recorded != len(ids) * len(keys):
            raise SystemExit(f"the Dagster run recorded {recorded} of {len(ids) * len(keys)} materializations")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="long side of the photos, px")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = build_tiny_models(tmp_path / "models")
        settings = {
            "PHOTOSET_SETTINGS": str(tmp_path / "photoset.toml"),  # none: only what is set here
            "PHOTOSET_DEVICE": "cpu",
            "PHOTOSET_DINOV3_MODEL": str(models.dinov3),
            "PHOTOSET_CAPTION_MODEL": str(models.gemma),
            "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "8",
            "PHOTOSET_VAE_MODEL": str(models.flux),
            "PHOTOSET_VAE_INPUT_MODE": "original",  # bucket-size encodes on a 2-core CPU would swamp the rest
            "PHOTOSET_T5_MODEL": str(models.t5),
        }
        source = DataLayout(tmp_path / "source")
        ids = write_photos(source, args.images, args.size)
        print(f"{args.images} photos of {args.size} px (long side), tiny models on the CPU, {os.cpu_count()} CPUs, "
              f"{args.repeats} run(s) each, alternating")
        loop_totals, dagster_totals, loads = [], [], {}
        loop_seconds: dict[str, float] = {}
        # ABBA order (loop, Dagster, Dagster, loop, ...): drift of the machine hits both sides alike.
        order = [side for repeat in range(args.repeats) for side in (("loop", "dagster") if repeat % 2 == 0
                                                                      else ("dagster", "loop"))]
        for index, side in enumerate(order):
            layout = DataLayout(tmp_path / f"{side}-{index}")
            shutil.copytree(source.root, layout.root, symlinks=True)
            resources = resources_from_env({**settings, "PHOTOSET_DATA_ROOT": str(layout.root)})
            if side == "loop":
                started = time.perf_counter()
                loop_seconds = plain_loop(resources, layout, ids)
                loop_totals.append(time.perf_counter() - started)
            else:
                before = dict(LOAD_COUNTS)
                dagster_totals.append(dagster_run(resources, ids, tmp_path / f"dagster_home-{index}"))
                loads = {family: LOAD_COUNTS[family] - before.get(family, 0)
                         for family in ("captioner", "dinov3", "flux_vae", "t5")}
            print(f"  {side:<8}{(loop_totals if side == 'loop' else dagster_totals)[-1]:8.2f} s", flush=True)
            shutil.rmtree(layout.root)
        loop_total, dagster_total = statistics.median(loop_totals), statistics.median(dagster_totals)
        # Each repeat's two runs ran back to back: their ratio is the least exposed to the machine's drift.
        pair_ratios = [dagster / loop for loop, dagster in zip(loop_totals, dagster_totals)]

    print("\nplain loop, per stage:")
    for stage, seconds in loop_seconds.items():
        print(f"  {stage:<18}{seconds:8.2f} s{args.images / seconds:10.1f} images/s")
    print(f"\nmodel loads in the Dagster run: {loads}")
    print(f"plain loop (median):   {loop_total:8.2f} s")
    print(f"Dagster run (median):  {dagster_total:8.2f} s  (one run, {args.images} partitions x {len(ASSETS)} assets)")
    print(f"ratio Dagster / loop:  {statistics.median(pair_ratios):8.2f} x  (target <= 1.10; median of the "
          f"repeats' pairs: {', '.join(f'{ratio:.2f}' for ratio in pair_ratios)})")
    print(f"bookkeeping:           {1000 * (dagster_total - loop_total) / (args.images * len(ASSETS)):8.2f} ms per image "
          "per asset")


if __name__ == "__main__":
    main()
