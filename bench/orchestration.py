"""Benchmark what Dagster's orchestration costs at the user's scale, on each kind of instance.

    python bench/orchestration.py [--images 2000] [--ids 60000] [--new 1000] [--no-postgres]

1. Bookkeeping per image per asset: one range run of a cheap asset (``image_facts``, forced, so every
   image is computed and recorded) over ``--images`` photos, against the same stage in a plain loop,
   on photoset's default instance (SQLite with photoset's batched event log) and on Dagster's stock
   SQLite storage, then on PostgreSQL (a throwaway local server, fsync off) with photoset's event log
   (deploy/postgres/dagster.yaml) and with Dagster's own; Postgres is skipped when its server
   binaries are missing.
2. The photo-list sensor's tick, as the daemon runs it, over a ``--ids`` list served on loopback (in a
   process of its own, 100 photos a page): the first tick (registers every id, requests range runs),
   a tick on the unchanged list once everything is synced, and a tick after ``--new`` ids were added.
   The daemon gives a tick about 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
warnings.filterwarnings("ignore")

import dagster as dg  # noqa: E402
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG  # noqa: E402

from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.links import ensure_approved_link  # noqa: E402
from photoset_dagster.definitions import build_definitions  # noqa: E402
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME  # noqa: E402
from photoset_dagster.defs.resources import resources_from_env  # noqa: E402
from photoset_dagster.demo.server import PhotoServer  # noqa: E402
from photoset_dagster.instance import INSTANCE_CONFIGS, prepare_dagster_home, project_root  # noqa: E402
from photoset_dagster.stages.base import IMAGE_FACTS  # noqa: E402
from photoset_dagster.stages.pipeline import run_pipeline  # noqa: E402
from photoset_dagster_tests.postgres_server import postgres_unavailable, throwaway_postgres  # noqa: E402

PAGE_SIZE = 100
SIZES = ((640, 480), (480, 640), (512, 512))


def image_ids(count: int, start: int = 0) -> list[str]:
    return [f"img{index:06d}" for index in range(start, start + count)]


def write_photos(layout: DataLayout, ids: list[str]) -> None:
    layout.ensure_dirs()
    bodies = []
    for width, height in SIZES:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(width).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        bodies.append(buffer.getvalue())
    for index, image_id in enumerate(ids):
        layout.raw_path(image_id).write_bytes(bodies[index % len(bodies)])
        ensure_approved_link(layout, image_id, "jpg")


@contextlib.contextmanager
def instance_home(kind: str, scratch: Path) -> Iterator[Path]:
    """A fresh DAGSTER_HOME of one kind: photoset's default, Dagster's stock SQLite, or Postgres."""
    home = Path(tempfile.mkdtemp(dir=scratch, prefix="dagster-home-"))
    os.environ["DAGSTER_HOME"] = str(home)  # photoset's event log finds its files through it
    if kind == "dagster stock SQLite":  # the project's file as it is: no photoset event log
        shutil.copy(project_root() / INSTANCE_CONFIGS["sqlite"], home / "dagster.yaml")
        yield home
    elif kind.endswith("PostgreSQL"):
        with throwaway_postgres() as server:
            os.environ.update(server.instance_env())
            prepare_dagster_home({"DAGSTER_HOME": str(home), "PHOTOSET_INSTANCE": "postgres"})
            if kind.startswith("dagster stock"):  # the same database settings, Dagster's own storage classes
                config = yaml.safe_load((home / "dagster.yaml").read_text())
                postgres_db = config.pop("run_storage")["config"]["postgres_db"]
                del config["event_log_storage"], config["schedule_storage"]
                config["storage"] = {"postgres": {"postgres_db": postgres_db}}
                (home / "dagster.yaml").write_text(yaml.safe_dump(config))
            yield home
    else:
        prepare_dagster_home({"DAGSTER_HOME": str(home)})
        yield home


def facts_run(defs: dg.Definitions, home: Path, ids: list[str]) -> float:
    key = dg.AssetKey(IMAGE_FACTS)
    job = defs.resolve_implicit_job_def_def_for_assets([key])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, ids)
        started = time.perf_counter()
        result = job.execute_in_process(
            instance=instance, asset_selection=[key], raise_on_error=False,
            tags={ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]},
            run_config={"ops": {"image_pipeline": {"config": {"force": True}}},
                        "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        seconds = time.perf_counter() - started
        if not result.success or len(instance.get_materialized_partitions(key)) != len(ids):
            raise SystemExit("the image_facts run did not record every image")
    return seconds


def facts_loop(layout: DataLayout, ids: list[str]) -> float:
    started = time.perf_counter()
    for _ in run_pipeline(layout, [IMAGE_FACTS], ids, force=True):
        pass
    return time.perf_counter() - started


def bookkeeping(scratch: Path, images: int, with_postgres: bool) -> None:
    layout = DataLayout(scratch / "data")
    ids = image_ids(images)
    write_photos(layout, ids)
    defs = build_definitions(resources_from_env({"PHOTOSET_SETTINGS": str(scratch / "none.toml"),
                                                 "PHOTOSET_DATA_ROOT": str(layout.root)}))
    kinds = ["photoset default (SQLite)", "dagster stock SQLite"]
    if with_postgres:
        if (reason := postgres_unavailable()) is None:
            kinds += ["photoset PostgreSQL", "dagster stock PostgreSQL"]
        else:
            print(f"(PostgreSQL skipped: {reason})")
    facts_loop(layout, ids)  # warm the page cache for everyone
    print(f"\n1. one range run of image_facts (forced) over {images} images, against the same stage in a loop")
    print(f"{'instance':<28}{'run s':>8}{'loop s':>8}{'ms/image/asset':>16}")  # asset: materialization + check
    for kind in kinds:
        loop_s = facts_loop(layout, ids)
        with instance_home(kind, scratch) as home:
            run_s = facts_run(defs, home, ids)
        print(f"{kind:<28}{run_s:8.2f}{loop_s:8.2f}{1000 * (run_s - loop_s) / images:16.2f}", flush=True)


def serve_list(ids: list[str], ready, stop) -> None:
    """Child process: the list of ``ids`` (files are never fetched by a tick) until ``stop``."""
    with PhotoServer() as server:
        items = [{"filename": image_id, "exportable_url": server.file_url(image_id)} for image_id in ids]
        server.set_pages([items[i : i + PAGE_SIZE] for i in range(0, len(items), PAGE_SIZE)])
        ready.put(server.photos_url)
        stop.wait()


@contextlib.contextmanager
def served_list(ids: list[str]) -> Iterator[str]:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.SimpleQueue(), context.Event()
    process = context.Process(target=serve_list, args=(ids, ready, stop), daemon=True)
    process.start()
    try:
        yield ready.get()
    finally:
        stop.set()
        process.join()


def sensor_ticks(scratch: Path, count: int, new: int) -> None:
    layout = DataLayout(scratch / "sensor-data")
    layout.ensure_dirs()
    ids, added = image_ids(count), image_ids(new, start=count)
    print(f"\n2. photo_list_sensor ticks over a {count}-id list ({count // PAGE_SIZE} pages) on photoset's default instance")

    def tick(photos_url: str, instance: dg.DagsterInstance, cursor: str | None):
        defs = build_definitions(resources_from_env({
            "PHOTOSET_SETTINGS": str(scratch / "none.toml"), "PHOTOSET_DATA_ROOT": str(layout.root),
            "PHOTOSET_PHOTOS_URL": photos_url, "PHOTOSET_ALLOW_HTTP": "1"}))
        sensor = defs.resolve_sensor_def("photo_list_sensor")
        context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"photoset": defs.resources["photoset"]})
        started = time.perf_counter()
        data = sensor.evaluate_tick(context)
        return data, time.perf_counter() - started

    with instance_home("photoset default (SQLite)", scratch) as home, \
            dg.DagsterInstance.from_config(str(home)) as instance:
        with served_list(ids) as photos_url:
            first, first_s = tick(photos_url, instance, None)
            print(f"  first tick (registers {count} ids):        {first_s:6.2f} s, {len(first.run_requests)} run request(s)")
            for image_id in ids:  # what those runs leave: every id synced
                os.symlink(os.path.join("..", "raw", image_id), layout.approved_link(image_id, "jpg"))
            unchanged, unchanged_s = tick(photos_url, instance, first.cursor)
            print(f"  unchanged list, everything synced:        {unchanged_s:6.2f} s, "
                  f"{len(unchanged.run_requests)} run request(s) ({unchanged.skip_message})")
        with served_list(ids + added) as photos_url:
            grown, grown_s = tick(photos_url, instance, unchanged.cursor or first.cursor)
            print(f"  {new} new ids:                           {grown_s:6.2f} s, {len(grown.run_requests)} run request(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--ids", type=int, default=60_000)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    saved_env = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            bookkeeping(Path(scratch), args.images, not args.no_postgres)
            sensor_ticks(Path(scratch), args.ids, args.new)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


if __name__ == "__main__":
    main()
