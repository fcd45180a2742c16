"""Benchmark the dataset report at the user's scale: ``build_report`` (what the ``dataset_report`` asset
and ``photoset report`` run once thumbnails exist) over a data root of 60,000 ready images, against
the least any report must do in the same run: reading the dataset JSONL.

    python bench/report.py [--images 60000] [--repeats 3]

The data root holds the dataset JSONL with seed-length captions across the seven buckets, a thumbnail
file per image, 1 % of the images in the failure ledger and 0.5 % in duplicate clusters. Printed: the
baseline, the report's seconds (median of the repeats), the ratio and the page's size. The issue's
bound: well under a minute.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from photoset_dagster.core.buckets import BUCKET_NAMES, parse_bucket  # noqa: E402
from photoset_dagster.core.failures import Failure, record_failure  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.near_duplicates import Cluster, near_duplicates_path, write_clusters  # noqa: E402
from photoset_dagster.core.records import iter_jsonl, write_jsonl_atomic  # noqa: E402
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
    write_clusters(near_duplicates_path(layout), [
        Cluster(f"dup-{k}", "near", (f"img{2 * k:06d}", f"img{2 * k + 1:06d}"), 0.99, 0.99, (), (), 1, 0.95)
        for k in range(count // 200)
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        layout = DataLayout(Path(tmp) / "data")
        make_data_root(layout, args.images)
        read_times, report_times = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            read = sum(record is not None for _, record, _ in iter_jsonl(layout.dataset_jsonl))
            read_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            summary = build_report(layout, note="synthetic")
            report_times.append(time.perf_counter() - started)
        assert read == summary.images == args.images, (read, summary.images)

    baseline, report = statistics.median(read_times), statistics.median(report_times)
    print(f"{args.images} images ({summary.thumbnails} with thumbnails), {summary.failures} failed images, "
          f"{summary.clusters} clusters; medians of {args.repeats}")
    print(f"  read the dataset JSONL (baseline): {baseline:6.2f} s")
    print(f"  build_report:                      {report:6.2f} s  ({report / baseline:.1f}x the baseline; "
          f"bound: well under 60 s)")
    print(f"  page: {summary.bytes / 1e6:.1f} MB, one file, paginated")


if __name__ == "__main__":
    main()
