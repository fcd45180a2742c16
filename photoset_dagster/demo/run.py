"""`photoset demo`: the whole pipeline, offline, on a local photo server and tiny random-weight models.

The demo writes its settings as the ``demo`` profile of the project's ``photoset.toml`` and makes it
the active profile, so afterwards every command — ``photoset verify``, ``migrate``, ``shards``,
``dagster asset materialize``, ``photoset dev`` — works on the demo data with no environment tweak.
``photoset demo serve`` serves the same photo list again on the same address, so ``photo_list`` and the
sensor can be tried in the web UI. It uses the project's persistent Dagster instance, so the web UI
shows the demo's runs, partitions and metadata.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from ..core.failures import iter_failures
from ..core.layout import NPY_KINDS, DataLayout
from ..core.links import scan_approved_links
from ..defs.settings import ENV_NAMES, load_settings, settings_path, write_profile
from .catalog import demo_bad_items, demo_id, load_demo
from .server import PhotoServer
from .tiny_models import build_tiny_models

PROFILE = "demo"
DEMO_PORT = 8765  # fixed, so `photoset demo serve` answers at the address the profile names
# Tiny models caption short, random text; 24 new tokens keep the demo quick on a laptop CPU.
DEMO_CAPTION_TOKENS = 24
RANDOM_CAPTIONS_NOTE = (
    "Demo data: captions, embeddings and latents come from tiny random-weight models, so the captions are "
    "gibberish on purpose; point the model settings at the real checkpoints for real ones."
)


def demo_settings(layout: DataLayout, photos_url: str) -> dict[str, object]:
    models = build_tiny_models(layout.state_dir / "demo-models")
    return {
        "photoset.data_root": str(layout.root),
        "photoset.photos_url": photos_url,
        "photoset.allow_http": True,
        "photoset.min_free_gb": 0.5,
        "photoset.report_note": RANDOM_CAPTIONS_NOTE,
        # Random tiny models make unrelated pictures look alike (cosine up to ~0.99): only the planted
        # duplicates (>= 0.9998) should cluster.
        "photoset.near_duplicate_threshold": 0.995,
        "models.device": "cpu",
        "dinov3.model_id": str(models.dinov3),
        "captioner.model_id": str(models.gemma),
        "captioner.max_new_tokens": DEMO_CAPTION_TOKENS,
        "flux_vae.model_id": str(models.flux),
        "t5.model_id": str(models.t5),
    }


def _free_port(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]


def _count(folder: Path, suffix: str) -> int:
    return sum(1 for name in os.listdir(folder) if name.endswith(suffix)) if folder.is_dir() else 0


def print_outputs(layout: DataLayout, expected: int) -> None:
    links = scan_approved_links(layout)
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    say("\nDemo outputs:")
    say(f"  approved links:   {len(links)} of {expected} good demo photos  ({layout.approved_dir})")
    say(f"  image facts:      {_count(layout.kind_dir('facts'), '.json')}")
    say(f"  captions:         {_count(layout.kind_dir('captions'), '.json')}")
    for kind in NPY_KINDS:
        say(f"  {kind + ':':<18}{_count(layout.kind_dir(kind), '.npy')} .npy")
    records = sum(1 for _ in open(layout.dataset_jsonl, encoding="utf-8")) if layout.dataset_jsonl.is_file() else 0
    say(f"  dataset records:  {records}  ({layout.dataset_jsonl})")
    shards = sorted(layout.shards_dir.glob("bucket_*/shard-*.tar"))
    say(f"  shards:           {len(shards)} in {len({s.parent for s in shards})} buckets  ({layout.shards_dir})")
    say(f"\n{RANDOM_CAPTIONS_NOTE}")


def _expected_failures(server: PhotoServer) -> set[str]:
    """The bad list items that are valid ids and so must fail their sync (HTML body, 404, ftp URL)."""
    return {demo_id(label) for label in ("bad-html", "bad-404", "bad-ftp")} & {
        item.get("filename") for item in demo_bad_items(server) if isinstance(item, dict)}


def run_demo(photos: int | None, verbose: bool, run: Callable[..., int], report: Callable[[], int]) -> int:
    from ..cli import EXIT_OK, EXIT_PARTIAL

    layout = DataLayout(load_settings().values["photoset.data_root"])
    layout.ensure_dirs()
    port = _free_port(DEMO_PORT)
    with PhotoServer(port=port) as server:
        good = load_demo(server, photos_limit=photos)
        expected_failures = _expected_failures(server)
        print(f"demo: serving {len(good)} photos (+ bad items) at {server.photos_url}", file=sys.stderr)
        settings = demo_settings(layout, server.photos_url)
        write_profile(settings_path(), PROFILE, settings)
        os.environ.pop("PHOTOSET_PROFILE", None)
        # The demo runs on its profile and the defaults alone, whatever this shell exports, so that every
        # later command (which reads the same profile) finds its artefacts current.
        for name, key in ENV_NAMES.items():
            if key != "photoset.data_root" and os.environ.pop(name, None) is not None:
                print(f"demo: ignoring {name} for the demo run (settings: the demo profile)", file=sys.stderr)
        print(f"demo: settings written to {settings_path()} as profile {PROFILE!r} (now the active one)",
              file=sys.stderr)
        config = {"refresh_list": True, "passes": ["sync", "all"], "build_dataset": True}
        code = run("catch_up_job", "catch_up", config, verbose, quiet_partial=True)
    failures = [failure for failure in iter_failures(layout) if not failure.upstream]  # the first, per image
    if code == EXIT_PARTIAL:
        unexpected = [f for f in failures if f.image_id not in expected_failures]
        for failure in unexpected or failures:
            print(f"{'error' if unexpected else 'demo'}: {failure.image_id} failed at {failure.stage}: {failure.reason}",
                  file=sys.stderr)
        if not unexpected:
            print(f"demo: those {len(failures)} deliberately bad list items failed as intended (later stages skip "
                  "them); the web UI shows them Failed with these reasons", file=sys.stderr)
            code = EXIT_OK
    if code == EXIT_OK:
        code = report()
    print_outputs(layout, len(good))
    print("\nNext: `photoset dev` opens the web UI on http://127.0.0.1:3000 (the demo profile is active);"
          " `photoset demo serve` serves the demo photo list again for photo_list and the sensor.",
          file=sys.stderr)
    return code


def serve_demo() -> int:
    """Serve the demo catalog at the address the active profile's photos_url names, until Ctrl-C."""
    settings = load_settings()
    url = urllib.parse.urlsplit(str(settings.values["photoset.photos_url"]))
    if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        from ..cli import CliError

        raise CliError(f"photoset.photos_url is {url.geturl()} ({settings.sources['photoset.photos_url']}), not a demo "
                       "address: run `photoset demo` first (or `photoset config --use demo`)")
    with PhotoServer(port=url.port) as server:
        good = load_demo(server)
        print(f"demo: serving {len(good)} photos (+ bad items) at {server.photos_url}; Ctrl-C stops", file=sys.stderr)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
