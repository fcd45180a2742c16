"""Benchmark the sync stage: this project's concurrent sync against a sequential one-at-a-time
baseline (the seed's shape), both against the same loopback PhotoServer with per-request latency.

    python bench/sync.py [--photos 2000] [--latency-ms 20] [--concurrency 16]

Each side starts from an empty data root, fetches every page, downloads every file, detects its
type and creates its link; the run checks that both end with the same links. The server runs in
its own process, as a real one would: in-process, its threads would compete with the client's for
the GIL and the benchmark would mostly measure the server.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from photoset_dagster.core.download import Downloader  # noqa: E402
from photoset_dagster.core.filetypes import HEAD_BYTES, detect_type  # noqa: E402
from photoset_dagster.core.http import make_client  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.photolist import PhotoListClient  # noqa: E402
from photoset_dagster.core.sync import SyncOptions, sync_images  # noqa: E402
from photoset_dagster.demo.catalog import demo_id  # noqa: E402
from photoset_dagster.demo.server import PhotoServer  # noqa: E402

PAGE_SIZE = 100


def small_image(index: int) -> bytes:
    """A few hundred bytes of valid PNG or JPEG, different for every index."""
    pixels = np.random.default_rng(index).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG" if index % 2 else "JPEG", quality=70)
    return buffer.getvalue()


def serve_photos(count: int, latency_s: float, ready: multiprocessing.SimpleQueue, stop: multiprocessing.Event) -> None:
    """Child process: serve ``count`` photos until ``stop`` is set; reports the list URL on ``ready``."""
    with PhotoServer(latency_s=latency_s) as server:
        items = []
        for index in range(count):
            image_id = demo_id(f"bench-{index}")
            server.set_file(image_id, small_image(index))
            items.append({"filename": image_id, "exportable_url": server.file_url(image_id)})
        server.set_pages([items[start : start + PAGE_SIZE] for start in range(0, len(items), PAGE_SIZE)])
        ready.put(server.photos_url)
        stop.wait()


def sequential_baseline(photos_url: str, layout: DataLayout) -> None:
    """One request at a time, like the seed: page, then each missing file, write, detect, link."""
    layout.raw_dir.mkdir(parents=True)
    layout.approved_dir.mkdir(parents=True)
    with httpx.Client(timeout=30.0) as client:
        page = 1
        while items := client.get(f"{photos_url}?page={page}").raise_for_status().json():
            for item in items:
                raw = layout.raw_dir / item["filename"]
                if not raw.exists():
                    raw.write_bytes(client.get(item["exportable_url"]).raise_for_status().content)
                with open(raw, "rb") as handle:
                    ext = detect_type(handle.read(HEAD_BYTES))
                link = layout.approved_dir / f"{raw.name}.{ext}"
                if not os.path.lexists(link):
                    os.symlink(os.path.join("..", "raw", raw.name), link)
            page += 1


def project_sync(photos_url: str, layout: DataLayout, concurrency: int) -> None:
    with make_client(max_connections=concurrency) as client:
        listing = PhotoListClient(photos_url, client).fetch_listing()
        downloader = Downloader(client, concurrency=concurrency, allow_http=True)
        stats = sync_images(listing.items, layout, downloader, SyncOptions(progress_every=0), log=lambda line: None)
    if stats.failures:
        example = next(iter(stats.failures.items()))
        raise SystemExit(f"project sync failed for {len(stats.failures)} photos, e.g. {example}")


def timed(label: str, run) -> float:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(f"{label:<34}{seconds:8.2f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    ready, stop = context.SimpleQueue(), context.Event()
    server = context.Process(target=serve_photos, args=(args.photos, args.latency_ms / 1000, ready, stop), daemon=True)
    server.start()
    try:
        photos_url = ready.get()
        pages = -(-args.photos // PAGE_SIZE) + 1  # plus the empty page
        print(
            f"{args.photos} photos ({pages} pages of {PAGE_SIZE}), {args.latency_ms:g} ms latency per request, "
            f"concurrency {args.concurrency}",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as scratch:
            baseline_layout = DataLayout(Path(scratch, "baseline"))
            project_layout = DataLayout(Path(scratch, "project"))
            baseline = timed("sequential baseline:", lambda: sequential_baseline(photos_url, baseline_layout))
            project = timed("photoset sync:", lambda: project_sync(photos_url, project_layout, args.concurrency))
            if sorted(os.listdir(baseline_layout.approved_dir)) != sorted(os.listdir(project_layout.approved_dir)):
                raise SystemExit("the two runs produced different links")
        print(f"{'speed-up:':<34}{baseline / project:8.1f} x", flush=True)
    finally:
        stop.set()
        server.join()

if __name__ == "__main__":
    main()
