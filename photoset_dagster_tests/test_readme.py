"""The README's code is true as written: the snippet that reads the shards runs and prints what it
says, the settings example loads with the values it claims, and every `photoset` command it shows
exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from photoset_dagster.cli import COMMANDS
from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.shards import ShardOptions, read_dataset_records, write_bucket_shards
from photoset_dagster.defs.settings import load_settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def code_block(after: str, language: str) -> str:
    """The first ```language block after the text ``after``."""
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def test_the_shards_snippet_prints_each_sample_with_its_array_shapes(layout, dataset_factory):
    ids = [f"sq{n}" for n in range(3)] + ["tall0"]
    images = {image_id: dataset_factory.add(image_id, bucket="832x1216" if image_id == "tall0" else "1024x1024")
              for image_id in ids}
    build_dataset_jsonl(layout, ids, dataset_factory.recipes)
    for bucket in ("1024x1024", "832x1216"):
        write_bucket_shards(layout, bucket, read_dataset_records(layout), ShardOptions(shard_size=2))

    snippet = code_block("<!-- shards-snippet", "python")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=layout.root.parent, capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(ids)
    arrays = images["sq0"].arrays
    shapes = " ".join(str(arrays[kind].shape) for kind in ("dinov3", "vae_latents", "t5_hidden"))
    assert f"sq0 1024x1024 {shapes} {sum(images['sq0'].mask)} tokens" in lines


def test_the_settings_example_loads_with_the_values_it_shows(tmp_path):
    settings = tmp_path / "photoset.toml"
    settings.write_text(code_block("## Configuration", "toml"))

    loaded = load_settings({"PHOTOSET_SETTINGS": str(settings)})

    assert loaded.profile == "gpu"
    assert loaded.values["photoset.data_root"] == "/srv/photoset/data"
    assert loaded.values["t5.max_length"] == 512
    assert loaded.values["models.device"] == "cuda" and loaded.sources["models.device"] == "photoset.toml [profile gpu]"
    assert (loaded.values["captioner.backend"], loaded.values["captioner.concurrency"]) == ("openai", 64)


def test_every_photoset_command_the_readme_shows_exists():
    shown = set(re.findall(r"\.venv/bin/photoset ([a-z]+)", README))
    assert shown and shown <= set(COMMANDS), shown - set(COMMANDS)
