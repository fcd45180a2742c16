"""Shard writer throughput against GNU tar on the same files.

Synthesises N samples with the seed's array sizes (DINOv3 (1024,) float32, VAE (16, 128, 128) float16,
T5 (77, 1024) float16) as real ``.npy`` artefacts with their sidecars' proofs, plus their dataset
records, then times, in the same run and on the same warm page cache, ``tar -cf`` of those files and
``write_bucket_shards``. Our writer
also hashes every shard (for the index), checks each array against its sidecar's proof (a stat; the
sha256 only for a file that moved) and by default fsyncs each shard before the rename; tar does none,
so tar is also timed followed by ``sync`` of its archive (like for like), and ours with fsync=False.

    .venv/bin/python bench/shards.py --samples 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photoset_dagster.core.artefacts import sha256_file  # noqa: E402
from photoset_dagster.core.atomic import atomic_write_json, save_npy_atomic  # noqa: E402
from photoset_dagster.core.layout import DataLayout  # noqa: E402
from photoset_dagster.core.shards import ShardOptions, write_bucket_shards  # noqa: E402

BUCKET = "1024x1024"
SHAPES = {
    "dinov3": ((1024,), np.float32),
    "vae_latents": ((16, 128, 128), np.float16),
    "t5_hidden": ((77, 1024), np.float16),
}
T5_TOKENS = 77


def synthesise(layout: DataLayout, samples: int) -> list[dict]:
    """Write the arrays of ``samples`` images (distinct bytes per image) and return their dataset records."""
    rng = np.random.default_rng(0)
    base = {kind: rng.standard_normal(shape).astype(dtype) for kind, (shape, dtype) in SHAPES.items()}
    recipes = {kind: f"{kind[:4]}-recipe-hash" for kind in ("captions", *SHAPES)}
    records = []
    for n in range(samples):
        image_id = f"img{n:07d}"
        proofs = {}
        for kind, array in base.items():
            array.flat[0] = n  # distinct content, no per-sample random generation cost
            path = layout.npy_path(kind, image_id)
            save_npy_atomic(path, array, fsync=False)
            proofs[kind] = sha256_file(path)  # what the dataset record carries
            stat = path.stat()  # and the sidecar's proof of those bytes (the rest of a sidecar is not read here)
            atomic_write_json(layout.json_path(kind, image_id), {
                "npy_sha256": proofs[kind], "npy_size": stat.st_size, "npy_mtime_ns": stat.st_mtime_ns}, fsync=False)
        tokens = 5 + n % 60
        records.append({
            "image_id": image_id,
            "image_path": layout.image_path_field(image_id, "jpg"),
            "caption": f"A synthetic photograph number {n}, evenly lit, centred subject, plain background. " * 4,
            "t5_attention_mask": [1] * tokens + [0] * (T5_TOKENS - tokens),
            "height": 1024,
            "width": 1024,
            "aspect_bucket": BUCKET,
            "format_version": 2,
            "raw_sha256": f"{n:064x}",
            "recipes": recipes,
            "t5_max_length": T5_TOKENS,
            "npy_sha256": proofs,
        })
    return records


def time_tar(layout: DataLayout, records: list[dict], out_dir: Path, sync: bool) -> tuple[float, int]:
    listing = out_dir / "files.txt"
    listing.write_text("".join(f"{kind}/{record['image_id']}.npy\n" for record in records for kind in SHAPES))
    archive = out_dir / "tar.tar"
    os.sync()  # every timed run starts without someone else's dirty pages being written back
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(layout.derived_dir), "-T", str(listing)], check=True)
    if sync:
        subprocess.run(["sync", str(archive)], check=True)
    seconds = time.perf_counter() - started
    size = archive.stat().st_size
    archive.unlink()
    return seconds, size


def time_writer(layout: DataLayout, records: list[dict], shard_size: int, fsync: bool) -> tuple[float, int]:
    shutil.rmtree(layout.bucket_shard_dir(BUCKET), ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    report = write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=shard_size, fsync=fsync))
    return time.perf_counter() - started, report.bytes


def time_unchanged(layout: DataLayout, records: list[dict], shard_size: int) -> float:
    started = time.perf_counter()
    report = write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=shard_size))
    assert report.rewritten == 0, "an unchanged rebuild rewrote shards"
    return time.perf_counter() - started


LABELS = {
    "tar": "GNU tar -cf",
    "tar_sync": "GNU tar -cf + sync",
    "ours_nofsync": "write_bucket_shards fsync=False",
    "ours": "write_bucket_shards (default)",
}


def rate(label: str, seconds: float, size: int, samples: int) -> str:
    return f"{label:<34} {seconds:7.2f}s  {size / seconds / 1e6:8.1f} MB/s  {samples / seconds:8.1f} samples/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the best is reported")
    parser.add_argument("--workdir", type=Path, default=None, help="where to synthesise (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        layout = DataLayout(Path(work) / "data")
        layout.ensure_dirs()
        started = time.perf_counter()
        records = synthesise(layout, args.samples)
        os.sync()
        print(f"synthesised {args.samples} samples in {time.perf_counter() - started:.1f}s")

        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in LABELS}
        for _ in range(args.repeat):
            runs["tar"].append(time_tar(layout, records, Path(work), sync=False))
            runs["tar_sync"].append(time_tar(layout, records, Path(work), sync=True))
            runs["ours_nofsync"].append(time_writer(layout, records, args.shard_size, fsync=False))
            runs["ours"].append(time_writer(layout, records, args.shard_size, fsync=True))
        best = {name: min(results) for name, results in runs.items()}
        for name, label in LABELS.items():
            all_runs = ", ".join(f"{seconds:.2f}" for seconds, _ in runs[name])
            print(f"{rate(label, *best[name], args.samples)}   (runs: {all_runs}s)")
        unchanged = time_unchanged(layout, records, args.shard_size)
        print(f"{'unchanged rebuild':<34} {unchanged:7.2f}s  (nothing rewritten)")
        speed = {name: size / seconds for name, (seconds, size) in best.items()}
        print(f"ratio, default (fsync) vs tar + sync: {speed['ours'] / speed['tar_sync']:.2f}")
        print(f"ratio, fsync=False vs tar:            {speed['ours_nofsync'] / speed['tar']:.2f}")
        print(f"ratio, default (fsync) vs tar:        {speed['ours'] / speed['tar']:.2f}")

if __name__ == "__main__":
    main()
