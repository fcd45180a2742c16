"""`photoset demo`: the whole pipeline, offline, on a local photo server and tiny random-weight models.

It uses the project's persistent Dagster instance, so `photoset dev --demo` afterwards shows the runs,
the partitions and the data.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..core.layout import NPY_KINDS, DataLayout
from ..core.links import scan_approved_links
from .catalog import load_demo
from .server import PhotoServer
from .tiny_models import build_tiny_models

# Tiny models caption short, random text; 24 new tokens keep the demo quick on a laptop CPU.
DEMO_CAPTION_TOKENS = "24"


def demo_environment(layout: DataLayout, photos_url: str) -> dict[str, str]:
    models = build_tiny_models(layout.state_dir / "demo-models")
    return {
        "PHOTOSET_DATA_ROOT": str(layout.root),
        "PHOTOSET_PHOTOS_URL": photos_url,
        "PHOTOSET_ALLOW_HTTP": "1",
        "PHOTOSET_DEVICE": "cpu",
        "PHOTOSET_DINOV3_MODEL": str(models.dinov3),
        "PHOTOSET_CAPTION_MODEL": str(models.gemma),
        "PHOTOSET_CAPTION_MAX_NEW_TOKENS": DEMO_CAPTION_TOKENS,
        "PHOTOSET_VAE_MODEL": str(models.flux),
        "PHOTOSET_T5_MODEL": str(models.t5),
    }


def demo_env_file(layout: DataLayout) -> Path:
    """Written by the demo so `photoset dev --demo` configures the web UI with the same tiny models."""
    return layout.state_dir / "demo.env"


def _count(folder: Path, suffix: str) -> int:
    return sum(1 for name in os.listdir(folder) if name.endswith(suffix)) if folder.is_dir() else 0


def print_outputs(layout: DataLayout, expected: int) -> None:
    links = scan_approved_links(layout)
    print("\nDemo outputs:", file=sys.stderr)
    print(f"  approved links:   {len(links)} of {expected} good demo photos  ({layout.approved_dir})", file=sys.stderr)
    print(f"  image facts:      {_count(layout.kind_dir('facts'), '.json')}", file=sys.stderr)
    print(f"  captions:         {_count(layout.kind_dir('captions'), '.json')}", file=sys.stderr)
    for kind in NPY_KINDS:
        print(f"  {kind + ':':<18}{_count(layout.kind_dir(kind), '.npy')} .npy", file=sys.stderr)
    records = sum(1 for _ in open(layout.dataset_jsonl, encoding="utf-8")) if layout.dataset_jsonl.is_file() else 0
    print(f"  dataset records:  {records}  ({layout.dataset_jsonl})", file=sys.stderr)
    shards = sorted(layout.shards_dir.glob("bucket_*/shard-*.tar"))
    print(f"  shards:           {len(shards)} in {len({s.parent for s in shards})} buckets  ({layout.shards_dir})", file=sys.stderr)
    print("\nBrowse it: photoset dev --demo   (web UI on http://127.0.0.1:3000)", file=sys.stderr)


def run_demo(photos: int | None, verbose: bool, run: Callable[[str, str, dict, bool], int]) -> int:
    layout = DataLayout(os.environ.get("PHOTOSET_DATA_ROOT", "data"))
    layout.ensure_dirs()
    with PhotoServer() as server:
        good = load_demo(server, photos_limit=photos)
        print(f"demo: serving {len(good)} photos (+ bad items) at {server.photos_url}", file=sys.stderr)
        env = demo_environment(layout, server.photos_url)
        os.environ.update(env)
        demo_env_file(layout).write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "PHOTOSET_PHOTOS_URL"))
        config = {
            "refresh_list": True,
            "passes": ["sync", "all"],
            "build_dataset": True,
        }
        code = run("catch_up_job", "catch_up", config, verbose)
    print_outputs(layout, len(good))
    return code
