"""Dagster's own command lines on the project, as a user types them: `dagster asset materialize` over a
partition range, `dg launch` and `dg check defs`. Each process gets only DAGSTER_HOME and the settings
file (no PHOTOSET_* variables): the settings come from the file, the same as for every other process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from photoset_dagster.defs.settings import ENV_NAMES, write_profile
from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def project(photo_site, photoset_env, tmp_path) -> dict:
    """Synced photos, and a settings file holding what the tests' environment would say."""
    settings = Path(photoset_env["PHOTOSET_SETTINGS"])
    values = {ENV_NAMES[name]: value for name, value in photoset_env.items() if name in ENV_NAMES}
    write_profile(settings, "test", values)
    ids = photo_site.add_images(6)
    photo_site.publish(ids)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PHOTOSET_", "DAGSTER_"))}
    env = {**clean, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "PHOTOSET_SETTINGS": str(settings)}
    sync = subprocess.run([sys.executable, "-m", "photoset_dagster.cli", "sync"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr
    return {"env": env, "ids": ids, "data": Path(photoset_env["PHOTOSET_DATA_ROOT"]), "cwd": tmp_path}


def run(project: dict, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=project["env"], cwd=cwd or project["cwd"], capture_output=True,
                          text=True, timeout=600)


def materialized(project: dict, asset: str) -> set[str]:
    os.environ["DAGSTER_HOME"] = project["env"]["DAGSTER_HOME"]
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == project["ids"]
        return instance.get_materialized_partitions(dg.AssetKey(asset))


def test_dagster_asset_materialize_runs_one_pass_over_a_range_with_the_default_settings(project):
    first, last = project["ids"][0], project["ids"][-1]

    done = run(project, str(BIN / "dagster"), "asset", "materialize", "-m", "photoset_dagster.definitions",
               "--select", "vae_latents", "--partition-range", f"{first}...{last}")

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert materialized(project, "vae_latents") == set(project["ids"])
    assert len(list((project["data"] / "derived" / "vae_latents").glob("*.npy"))) == len(project["ids"])


def test_dg_launch_and_dg_check_defs_know_the_project(project):
    first, last = project["ids"][0], project["ids"][2]

    checked = run(project, str(BIN / "dg"), "check", "defs", cwd=REPO)
    launched = run(project, str(BIN / "dg"), "launch", "--assets", "image_facts", "--partition-range",
                   f"{first}...{last}", cwd=REPO)

    assert checked.returncode == 0 and "All definitions loaded successfully" in checked.stdout + checked.stderr
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert materialized(project, "image_facts") == set(project["ids"][:3])


def test_a_run_of_several_assets_runs_in_one_process(project):
    """Every step in the run's process (Dagster's default would fork one per step): models load once per
    run, and the run's lease — a flock of that process — outlives each step, so no reaper sees it dead."""
    done = run(project, str(BIN / "dagster"), "asset", "materialize", "-m", "photoset_dagster.definitions",
               "--select", "thumbnails,near_duplicates,dataset_report")

    assert done.returncode == 0, done.stderr[-3000:]
    os.environ["DAGSTER_HOME"] = project["env"]["DAGSTER_HOME"]
    with dg.DagsterInstance.get() as instance:
        (record,) = instance.get_run_records(limit=1)
        steps = [entry for entry in instance.all_logs(record.dagster_run.run_id)
                 if entry.is_dagster_event and entry.dagster_event.event_type_value == "STEP_START"]
    assert len(steps) == 3 and len({entry.dagster_event.pid for entry in steps}) == 1
