"""Benchmark the user's sync path: `photoset sync` (the CLI, Dagster and a fresh default instance
included) against img2dataset 1.47 and a one-at-a-time loop, side by side on one loopback CDN.

    python bench/sync.py [--photos 2000] [--kib 300] [--latency-ms 20] [--repeats 3]

The photos are real JPEGs of about ``--kib`` KiB (1024x768, every one different), made once and kept
in a cache folder. The server runs in its own process with ``--latency-ms`` before every answer.
Every contender starts from an empty output folder and runs as the user runs it, as its own
process, so start-up and bookkeeping count:

- ``photoset sync``: pages the list, downloads, detects types, links approved/, records one
  materialization per image in a fresh DAGSTER_HOME;
- img2dataset 1.47 (``--processes_count 2 --thread_count 32 --resize_mode no --output_format
  files``), installed in a venv of its own on first use (``--peer-venv``): as configured, it decodes
  and re-encodes every JPEG; "img2dataset raw" adds ``--disable_all_reencoding True`` and stores the
  bytes as downloaded, like photoset (its fastest setting). It is handed the URL list ready-made: it
  does not page the list, which flatters it slightly;
- a loop that does one request at a time, like the seed's script.

Runs alternate between contenders; the table shows each one's median and its throughput relative
to img2dataset and to the loop. Every run is checked to have stored every photo.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from photoset_dagster.core.filetypes import HEAD_BYTES, detect_type  # noqa: E402
from photoset_dagster.demo.catalog import demo_id  # noqa: E402
from photoset_dagster.demo.server import PhotoServer  # noqa: E402

PAGE_SIZE = 100
WIDTH, HEIGHT = 1024, 768
PEER = "img2dataset==1.47.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "photoset-bench"


def photo_folder(count: int, kib: int) -> Path:
    """``count`` different JPEGs of about ``kib`` KiB, made once (noise over a gradient: about as hard
    to compress as a photo, so the size comes from the noise level)."""
    folder = CACHE / f"sync-photos-{count}x{kib}k"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"making {count} JPEGs of ~{kib} KiB in {folder} (once) ...", flush=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    noise_pool = rng.normal(0, 1, (HEIGHT * 2, WIDTH * 2, 3)).astype(np.float32)
    sigma = 20.0 * (kib / 280) ** 1.5  # 1024x768 at quality 85: sigma 20 gives ~280 KiB
    for index in range(count):
        tint = rng.integers(0, 256, 3)
        top, left = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
        base = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 127 // (WIDTH + HEIGHT)], -1) + tint - 128
        noise = noise_pool[top : top + HEIGHT, left : left + WIDTH] * sigma
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{index:05d}.jpg", format="JPEG", quality=85)
    (folder / "done").write_text("")
    return folder


def serve_photos(folder: str, count: int, latency_s: float, ready, stop) -> None:
    """Child process: serve the photos in ``folder`` until ``stop`` is set; puts (list URL, URLs)."""
    with PhotoServer(latency_s=latency_s) as server:
        items = []
        for index in range(count):
            image_id = demo_id(f"bench-{index}")
            server.set_file(image_id, Path(folder, f"{index:05d}.jpg").read_bytes())
            items.append({"filename": image_id, "exportable_url": server.file_url(image_id)})
        server.set_pages([items[start : start + PAGE_SIZE] for start in range(0, len(items), PAGE_SIZE)])
        ready.put((server.photos_url, [item["exportable_url"] for item in items]))
        stop.wait()


def sequential_loop(photos_url: str, root: Path) -> None:
    """One request at a time, like the seed: page, then each missing file, write, detect, link."""
    raw_dir, approved_dir = root / "raw", root / "approved"
    raw_dir.mkdir(parents=True)
    approved_dir.mkdir()
    with httpx.Client(timeout=30.0) as client:
        page = 1
        while items := client.get(f"{photos_url}?page={page}").raise_for_status().json():
            for item in items:
                raw = raw_dir / item["filename"]
                if not raw.exists():
                    raw.write_bytes(client.get(item["exportable_url"]).raise_for_status().content)
                with open(raw, "rb") as handle:
                    ext = detect_type(handle.read(HEAD_BYTES))
                os.symlink(os.path.join("..", "raw", raw.name), approved_dir / f"{raw.name}.{ext}")
            page += 1


def quiet(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``command``; its output is shown only when it fails."""
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed ({done.returncode}):\n{done.stdout[-3000:]}")


def photoset_command() -> list[str]:
    script = Path(sys.executable).with_name("photoset")
    return [str(script)] if script.exists() else [sys.executable, "-m", "photoset_dagster.cli"]


def run_photoset(photos_url: str, root: Path) -> None:
    """`photoset sync` with a settings file of its own and a fresh DAGSTER_HOME (the instance photoset
    writes for a new home)."""
    settings = root.with_suffix(".toml")
    settings.write_text(f'[photoset]\ndata_root = "{root}"\nphotos_url = "{photos_url}"\nallow_http = true\n')
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PHOTOSET_", "DAGSTER_"))}
    env.update(PHOTOSET_SETTINGS=str(settings), DAGSTER_HOME=str(root.with_name(root.name + "-dagster")))
    quiet([*photoset_command(), "sync", "--progress-every", "0"], env=env)


def peer_venv(path: Path) -> Path:
    """img2dataset in a venv of its own (its pins would clash with the project's)."""
    python = path / "bin" / "python"
    if not (path / "bin" / "img2dataset").exists():
        print(f"installing {PEER} into {path} (once) ...", flush=True)
        quiet([sys.executable, "-m", "venv", str(path)])
        quiet([str(python), "-m", "pip", "install", "-q", PEER])
    return path


def run_img2dataset(venv: Path, urls: list[str], root: Path, *, reencode: bool) -> None:
    """``reencode``: img2dataset's default with ``resize_mode=no`` (decode, then re-encode each JPEG);
    without, ``--disable_all_reencoding``: the bytes stored as downloaded, as photoset stores them."""
    url_list = root.with_suffix(".txt")
    url_list.write_text("\n".join(urls) + "\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    quiet([str(venv / "bin" / "img2dataset"), "--url_list", str(url_list), "--input_format", "txt",
           "--output_folder", str(root), "--output_format", "files", "--processes_count", "2",
           "--thread_count", "32", "--resize_mode", "no", "--enable_wandb", "False",
           *([] if reencode else ["--disable_all_reencoding", "True"])], env=env)


def stored(name: str, root: Path) -> int:
    """Photos a finished run stored: links for the loop and photoset, img2dataset's own count."""
    if name.startswith("img2dataset"):
        return sum(json.loads(stats.read_text())["successes"] for stats in root.glob("*_stats.json"))
    return len(os.listdir(root / "approved"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--kib", type=int, default=300, help="approximate size of each JPEG")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-venv", type=Path, default=CACHE / "img2dataset-1.47-venv")
    parser.add_argument("--no-peer", action="store_true", help="skip img2dataset")
    args = parser.parse_args(argv)

    folder = photo_folder(args.photos, args.kib)
    total_mb = sum(path.stat().st_size for path in folder.glob("*.jpg")) / 1e6
    venv = None if args.no_peer else peer_venv(args.peer_venv)
    contenders = ["photoset sync", "sequential loop"]
    if venv is not None:
        contenders[1:1] = ["img2dataset", "img2dataset raw"]

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    ready, stop = context.SimpleQueue(), context.Event()
    server = context.Process(target=serve_photos, args=(str(folder), args.photos, args.latency_ms / 1000, ready, stop),
                             daemon=True)
    server.start()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        photos_url, urls = ready.get()
        print(f"{args.photos} JPEGs, {total_mb / args.photos * 1000:.0f} kB each on average ({total_mb:.0f} MB), "
              f"{args.latency_ms:g} ms latency per request, {args.repeats} runs each, {os.cpu_count()} CPUs",
              flush=True)
        runs = {
            "photoset sync": lambda root: run_photoset(photos_url, root),
            "img2dataset": lambda root: run_img2dataset(venv, urls, root, reencode=True),
            "img2dataset raw": lambda root: run_img2dataset(venv, urls, root, reencode=False),
            "sequential loop": lambda root: sequential_loop(photos_url, root),
        }
        with tempfile.TemporaryDirectory() as scratch:
            for repeat in range(args.repeats):
                for name in contenders:
                    root = Path(scratch, f"{name.replace(' ', '-')}-{repeat}")
                    started = time.perf_counter()
                    runs[name](root)
                    elapsed = time.perf_counter() - started
                    if (count := stored(name, root)) != args.photos:
                        raise SystemExit(f"{name} stored {count} of {args.photos} photos")
                    seconds[name].append(elapsed)
                    print(f"  run {repeat + 1} {name:<16}{elapsed:7.2f} s", flush=True)
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        stop.set()
        server.join()

    medians = {name: statistics.median(values) for name, values in seconds.items()}
    peers = [name for name in medians if name.startswith("img2dataset")]
    print(f"\n{'contender':<18}{'median s':>9}{'photos/s':>10}{'MB/s':>8}"
          + "".join(f"{'vs ' + peer:>20}" for peer in peers) + "  vs loop")
    for name, median in medians.items():
        line = f"{name:<18}{median:9.2f}{args.photos / median:10.0f}{total_mb / median:8.1f}"
        line += "".join(f"{medians[peer] / median:19.2f}x" for peer in peers)
        print(line + f"{medians['sequential loop'] / median:8.2f}x")


if __name__ == "__main__":
    main()
