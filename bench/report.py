"""Benchmark the dataset report at the user's scale: ``photoset report`` (the CLI: Dagster, a fresh
default instance, the ``thumbnails``, ``near_duplicates`` and ``dataset_report`` assets) over a data
root of 60,000 ready images, beside the report's render alone (``build_report``) and the least any
report must do, reading the dataset JSONL, all in the same run.

    python bench/report.py [--images 60000] [--repeats 3]

The data root holds the dataset JSONL with seed-length captions across the seven buckets, a thumbnail
file per image, a DINOv3 vector per image (1,024 floats) with 0.5 % planted near-duplicate pairs, and
1 % of the images in the failure ledger. Printed: each time (median of the repeats), the ratios and
the page's size. The issue's bound: well under a minute once thumbnails exist.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from photoset_dagster.core.buckets import BUCKET_NAMES, parse_bucket  # noqa: E402
from photoset_dagster.core.failures import Failure, record_failure  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.records import iter_jsonl, write_jsonl_atomic  # noqa: E402
from photoset_dagster.core.atomic import save_npy_atomic  # noqa: E402
from photoset_dagster.core.report import build_report  # noqa: E402

T5_MAX = 77
WORDS = ("a woman in a red dress stands on a stone pier weight on her left leg overcast daylight soft light "
         "harbour fishing boats low hills full body framing camera at chest height three quarter angle").split()


def make_data_root(layout: DataLayout, count: int) -> None:
    rng = random.Random(0)
    layout.ensure_dirs()
    layout.thumbnails_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        image_id = f"img{index:06d}"
        bucket = rng.choice(BUCKET_NAMES)
        width, height = parse_bucket(bucket)
        tokens = rng.randint(20, T5_MAX)
        records.append({
            "image_id": image_id, "image_path": f"data/approved/{image_id}.jpg",
            "caption": " ".join(rng.choices(WORDS, k=rng.randint(40, 80))),
            "t5_attention_mask": [1] * tokens + [0] * (T5_MAX - tokens), "height": height, "width": width,
            "aspect_bucket": bucket, "format_version": 2, "raw_sha256": f"{index:064x}",
            "recipes": {"captions": "c1", "dinov3": "d1", "vae_latents": "v1", "t5_hidden": "t1"},
            "t5_max_length": T5_MAX,
        })
        (layout.thumbnails_dir / f"{image_id}.webp").write_bytes(b"RIFF\0\0\0\0WEBP")  # listed, never decoded here
    write_jsonl_atomic(layout.dataset_jsonl, records)
    for index in range(count // 100):
        record_failure(layout, Failure(f"bad{index:05d}", "image_facts", f"cannot decode bad{index:05d}: truncated"))
    vectors = np.random.default_rng(0).standard_normal((count, 1024)).astype(np.float32)
    vectors[1 : count // 100 : 2] = vectors[0 : count // 100 - 1 : 2] + 0.01  # planted near-duplicate pairs
    for index, vector in enumerate(vectors):
        save_npy_atomic(layout.npy_path("dinov3", f"img{index:06d}"), vector, fsync=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        layout = DataLayout(Path(tmp) / "data")
        make_data_root(layout, args.images)
        env = {**os.environ, "PHOTOSET_SETTINGS": str(Path(tmp) / "none.toml"), "HF_HUB_OFFLINE": "1"}
        times: dict[str, list[float]] = {"read": [], "render": [], "cli": []}
        for repeat in range(args.repeats):  # the CLI first: the render then shows the clusters it found
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "photoset_dagster.cli", "report", "--data-root", str(layout.root)],
                env={**env, "DAGSTER_HOME": str(Path(tmp) / f"home-{repeat}")}, cwd=tmp, capture_output=True, text=True)
            times["cli"].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(f"photoset report failed:\n{done.stderr[-2000:]}")
            started = time.perf_counter()
            read = sum(record is not None for _, record, _ in iter_jsonl(layout.dataset_jsonl))
            times["read"].append(time.perf_counter() - started)
            started = time.perf_counter()
            summary = build_report(layout, note="synthetic")
            times["render"].append(time.perf_counter() - started)
        assert read == summary.images == args.images, (read, summary.images)

    read, render, cli = (statistics.median(times[name]) for name in ("read", "render", "cli"))
    print(f"{args.images} images ({summary.thumbnails} with thumbnails), {summary.failures} failed images, "
          f"{summary.clusters} duplicate clusters; medians of {args.repeats}")
    print(f"  read the dataset JSONL (baseline):          {read:6.2f} s")
    print(f"  render the report (build_report):           {render:6.2f} s  ({render / read:.1f}x the baseline)")
    print(f"  photoset report (CLI, Dagster, 3 assets):   {cli:6.2f} s  ({cli / read:.1f}x the baseline; "
          "bound: well under 60 s)")
    print(f"  page: {summary.bytes / 1e6:.1f} MB, one file, paginated")


if __name__ == "__main__":
    main()
