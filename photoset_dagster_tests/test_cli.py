"""The `photoset` CLI through its public interface: ``main([...])`` in-process against a temporary Dagster
home, the tiny models and a loopback photo server, plus real runs of the console script.

Every command is covered, with the seed's summaries users know, and every error path ends in exactly one
``error:`` line, the documented exit code (2: usage or configuration, 1: the work failed) and no traceback.

Most tests need a generated dataset; it is built once per module through the CLI itself (``sync``,
``generate --pass all``, ``migrate``) and each test gets its own copy of the data and the Dagster home.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from photoset_dagster.cli import main
from photoset_dagster.core.layout import NPY_KINDS, DataLayout
from photoset_dagster_tests.fixtures_http import image_bytes, tree_entries

REPO = Path(__file__).resolve().parents[1]
PHOTOSET_SCRIPT = Path(sys.executable).with_name("photoset")
IMAGES = 7
PAGE_SIZE = 6  # page 1: 6 photos, page 2: 1
SEED_SYNC_LABELS = (
    "processed:", "downloaded:", "download failed:", "missing raw:", "unknown type:",
    "symlink created:", "symlink updated:", "symlink unchanged:",
)
ERROR_LINE = re.compile(r"^(photoset(?: \w+)?: )?error: ")
ENGINE_NOISE = ("Execution of step", "Execution of run")


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if ERROR_LINE.match(line)]

    def summary(self, title: str = "Summary:") -> dict[str, str]:
        """The seed-style block after ``title``: its indented ``label: value`` rows."""
        lines = self.err.splitlines()
        start = lines.index(title) + 1
        rows = {}
        for line in lines[start:]:
            if not line.startswith("  "):
                break
            label, _, value = line.strip().rpartition(":")
            rows[label + ":"] = value.strip()
        return rows


def assert_one_error(outcome: Outcome, code: int, *fragments: str) -> str:
    """The outcome failed with ``code``, one ``error:`` line holding every fragment, and no traceback."""
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.err + outcome.out, outcome.err
    assert len(outcome.error_lines) == 1, outcome.err
    assert not [line for line in outcome.err.splitlines() if line.startswith(ENGINE_NOISE)], outcome.err
    line = outcome.error_lines[0]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


class Cli:
    """Runs ``photoset`` in-process; environment changes made by a command (the demo's) are undone after it."""

    def __init__(self, capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
        self.capsys = capsys
        self.env = env

    def __call__(self, *argv: str, **env: str) -> Outcome:
        saved = dict(os.environ)
        os.environ.update(env)
        self.capsys.readouterr()
        try:
            code = main(list(argv))
        finally:
            out, err = self.capsys.readouterr()
            os.environ.clear()
            os.environ.update(saved)
        return Outcome(code, out, err)


@pytest.fixture(scope="module")
def initialized_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DAGSTER_HOME holding the repo's dagster.yaml and its SQLite storage, schema created (seconds per fresh
    home, so each test copies this one)."""
    import dagster as dg

    from photoset_dagster.instance import prepare_dagster_home

    home = tmp_path_factory.mktemp("dagster_home")
    env = {"DAGSTER_HOME": str(home)}
    prepare_dagster_home(env)
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)  # the instance's storage config reads it
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.get_runs(limit=1)
    finally:
        os.environ.pop("DAGSTER_HOME") if saved is None else os.environ.__setitem__("DAGSTER_HOME", saved)
    return home


@pytest.fixture
def dagster_home(tmp_path: Path, initialized_home: Path) -> Path:
    home = tmp_path / "dagster_home"
    shutil.copytree(initialized_home, home)
    return home


@pytest.fixture
def cli_env(photoset_env: dict[str, str], dagster_home: Path) -> dict[str, str]:
    return {**photoset_env, "DAGSTER_HOME": str(dagster_home)}


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cli_env: dict[str, str]) -> Cli:
    for name in list(os.environ):
        if name.startswith("PHOTOSET_"):
            monkeypatch.delenv(name)
    for name, value in cli_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cli_env["DAGSTER_HOME"])  # a stray relative path would land here, not in the repo
    return Cli(capsys, cli_env)


@pytest.fixture
def ids(photo_site) -> list[str]:
    """IMAGES deterministic photos listed on the loopback server (the same bytes in every test)."""
    listed = photo_site.add_images(IMAGES)
    photo_site.publish(listed, page_size=PAGE_SIZE)
    return listed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the prepared dataset ---------------------------------------------------------------------


@dataclass
class Prepared:
    ids: list[str]
    layout: DataLayout
    outputs: dict[str, Outcome] = field(default_factory=dict)  # what building the template printed


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"dir": tmp_path_factory.mktemp("cli_template"), "outputs": None}


@pytest.fixture
def prepared(cli: Cli, ids: list[str], data_layout: DataLayout, dagster_home: Path, template: dict) -> Prepared:
    """A complete dataset (links, every artefact, the JSONL) and its Dagster records, made by the CLI once
    per module and copied for each test, so tests may change it freely."""
    saved_data, saved_home = template["dir"] / "data", template["dir"] / "dagster_home"
    if template["outputs"] is None:
        outputs = {
            "sync": cli("sync"),
            "generate": cli("generate", "--pass", "all"),
            "migrate": cli("migrate"),
        }
        for name, outcome in outputs.items():
            assert outcome.code == 0, (name, outcome)
        shutil.copytree(data_layout.root, saved_data, symlinks=True)
        shutil.copytree(dagster_home, saved_home, symlinks=True, dirs_exist_ok=True)
        template["outputs"] = outputs
    else:
        shutil.copytree(saved_data, data_layout.root, symlinks=True)
        shutil.copytree(saved_home, dagster_home, symlinks=True, dirs_exist_ok=True)
    return Prepared(ids, data_layout, template["outputs"])


def data_tree(layout: DataLayout) -> dict[str, str]:
    """Everything under the data root except the lock file every reader and writer takes (not data)."""
    entries = tree_entries(layout.root) if layout.root.exists() else {}
    entries.pop(os.path.relpath(layout.lock_path, layout.root), None)
    return entries


def artefact_files(layout: DataLayout, image_id: str) -> list[Path]:
    return [
        layout.json_path("facts", image_id),
        layout.json_path("captions", image_id),
        *(layout.npy_path(kind, image_id) for kind in NPY_KINDS),
    ]


def dataset_ids(layout: DataLayout) -> list[str]:
    return [json.loads(line)["image_id"] for line in layout.dataset_jsonl.read_text().splitlines()]


# --- sync ---------------------------------------------------------------------------------------


def test_sync_dry_run_downloads_and_links_nothing_and_prints_the_seed_summary(cli, ids, data_layout):
    data_layout.root.mkdir(parents=True)

    result = cli("sync", "--dry-run", "--end-page", "1", "--limit", "5")

    assert result.code == 0, result.err
    assert "page 2" not in result.err  # --end-page 1
    summary = result.summary()
    assert tuple(summary) == SEED_SYNC_LABELS
    assert summary["processed:"] == "5"  # --limit 5 of the 6 photos on page 1
    assert summary["downloaded:"] == "0" and summary["symlink created:"] == "0"
    assert result.err.count("would download") == 5
    assert not result.error_lines
    assert list(data_layout.root.iterdir()) == []  # no download, link, snapshot, folder or lock file


@pytest.mark.parametrize("argv", [["sync", "--dry-run"], ["prune", "--dry-run"], ["verify"], ["shards", "--dry-run"],
                                  ["migrate", "--dry-run"], ["report"]])
def test_read_only_commands_refuse_a_data_root_that_does_not_exist(cli, ids, data_layout, argv):
    result = cli(*argv)

    assert_one_error(result, 2, "does not exist", "check --data-root")
    assert not data_layout.root.exists()


def test_sync_links_every_photo_and_a_second_sync_changes_nothing(prepared, cli):
    first = prepared.outputs["sync"].summary()
    assert tuple(first) == SEED_SYNC_LABELS
    assert first["processed:"] == str(IMAGES) and first["downloaded:"] == str(IMAGES)
    assert first["symlink created:"] == str(IMAGES)
    links = sorted(prepared.layout.approved_dir.iterdir())
    assert [link.name for link in links] == [f"{i}.png" for i in prepared.ids]
    assert all(os.readlink(link) == f"../raw/{link.stem}" for link in links)

    again = cli("sync")

    assert again.code == 0, again.err
    summary = again.summary()
    assert summary["downloaded:"] == "0" and summary["symlink created:"] == "0"
    assert summary["symlink unchanged:"] == str(IMAGES)


def test_sync_stop_after_links(cli, ids, data_layout):
    result = cli("sync", "--stop-after-links", "2")

    assert result.code == 0, result.err
    assert result.summary()["symlink created:"] == "2"
    assert len(list(data_layout.approved_dir.iterdir())) == 2


@pytest.mark.parametrize("scope", [["--limit", "3"], ["--end-page", "1"], ["--dry-run"]])
def test_sync_prune_needs_a_full_scan(cli, ids, data_layout, scope):
    result = cli("sync", "--prune", *scope)

    assert_one_error(result, 2, "--prune needs a full scan")
    assert len(result.err.splitlines()) == 1
    assert not data_layout.approved_dir.exists()


# --- generate -----------------------------------------------------------------------------------


def test_generate_t5_before_captions_reports_each_failure_and_exits_3(cli, ids, data_layout):
    assert cli("sync").code == 0

    result = cli("generate", "--pass", "t5")

    assert_one_error(result, 3, f"{IMAGES} of {IMAGES} image(s) failed (t5_hidden)")  # images, not stage x image
    warned = [line for line in result.err.splitlines() if line.startswith("t5_hidden: ") and "no caption yet" in line]
    assert len(warned) == IMAGES
    assert f"t5_hidden: 0 done, 0 current, {IMAGES} failed" in result.err
    assert not list(data_layout.kind_dir("t5_hidden").glob("*.npy"))


def test_generate_all_made_every_artefact(prepared):
    err = prepared.outputs["generate"].err
    for stage in ("image_facts", "captions", "dinov3_embeddings", "vae_latents", "t5_hidden"):
        assert f"{stage}: {IMAGES} done, 0 current, 0 failed" in err, stage
    for image_id in prepared.ids:
        assert all(path.is_file() for path in artefact_files(prepared.layout, image_id)), image_id
    assert np.load(prepared.layout.npy_path("t5_hidden", prepared.ids[0])).shape == (77, 1024)
    assert dataset_ids(prepared.layout) == prepared.ids


def test_generate_one_pass_for_one_image(prepared, cli):
    image_id, other = prepared.ids[2], prepared.ids[3]
    prepared.layout.npy_path("vae_latents", image_id).unlink()
    untouched = prepared.layout.npy_path("vae_latents", other).stat().st_mtime_ns

    result = cli("generate", "--pass", "vae", "--image-id", image_id)

    assert result.code == 0, result.err
    assert "vae_latents: 1 done, 0 current, 0 failed" in result.err
    assert "captions" not in result.err and "t5_hidden" not in result.err
    assert prepared.layout.npy_path("vae_latents", image_id).is_file()
    assert prepared.layout.npy_path("vae_latents", other).stat().st_mtime_ns == untouched


def test_generate_an_unregistered_image_id_is_one_error_line(cli, ids):
    result = cli("generate", "--pass", "vae", "--image-id", "nope")

    assert_one_error(result, 1, "not registered", "nope")


def test_an_error_inside_a_run_is_reported_as_the_pipeline_error_not_dagsters_wrapper(cli, ids):
    assert cli("sync", "--limit", "1").code == 0

    result = cli("generate", "--pass", "dinov3", "--limit", "1", PHOTOSET_DEVICE="tpu9")

    line = assert_one_error(result, 1, "tpu9")
    assert "DagsterExecutionStepExecutionError" not in line


def test_a_failed_run_prints_only_its_error_line(cli, ids):
    result = cli("generate", "--pass", "vae", "--image-id", "nope")

    assert result.code == 1
    assert not [line for line in result.err.splitlines() if line.startswith(ENGINE_NOISE)], result.err


# --- shards ---------------------------------------------------------------------------------------


def test_shards_dry_run_writes_nothing_then_shards_are_written_per_bucket(prepared, cli):
    layout = prepared.layout
    before = data_tree(layout)

    dry = cli("shards", "--dry-run")

    assert dry.code == 0, dry.err
    assert "would write shard-000000.tar" in dry.err
    assert data_tree(layout) == before

    real = cli("shards", "--shard-size", "1")

    assert real.code == 0, real.err
    shards = sorted(layout.shards_dir.glob("bucket_*/shard-*.tar"))
    assert len(shards) == IMAGES  # one sample per shard
    assert len({shard.parent for shard in shards}) >= 3
    assert f"{layout.shards_dir}/bucket_<WxH>/shard-*.tar" in real.out


def test_shards_of_one_bucket(prepared, cli):
    bucket = json.loads(prepared.layout.json_path("facts", prepared.ids[0]).read_text())["aspect_bucket"]

    result = cli("shards", "--bucket", bucket)

    assert result.code == 0, result.err
    assert {p.parent.name for p in prepared.layout.shards_dir.glob("bucket_*/shard-*.tar")} == {f"bucket_{bucket}"}


def test_shards_of_an_unknown_bucket_is_a_usage_error(cli):
    result = cli("shards", "--bucket", "999x1")

    assert_one_error(result, 2, "unknown aspect bucket '999x1'")
    assert len(result.err.splitlines()) == 1


def test_shards_without_a_dataset_says_how_to_build_it(cli, data_layout):
    data_layout.root.mkdir(parents=True)

    result = cli("shards", "--dry-run")

    assert_one_error(result, 2, str(data_layout.dataset_jsonl), "photoset migrate")


# --- verify ---------------------------------------------------------------------------------------


def test_verify_passes_a_complete_dataset_and_names_a_truncated_file(prepared, cli):
    ok = cli("verify")

    assert ok.code == 0, ok.err
    assert "=== Stage 2 Data Verification ===" in ok.err
    assert f"  valid: {IMAGES}" in ok.err and "  invalid: 1" not in ok.err

    bad = prepared.ids[1]
    npy = prepared.layout.npy_path("t5_hidden", bad)
    npy.write_bytes(npy.read_bytes()[:100])

    broken = cli("verify")

    assert_one_error(broken, 1, "verification found invalid")
    assert f"invalid t5_hidden for {bad}" in broken.err
    t5_section = broken.err.split("T5 hidden states:")[1]
    assert "  invalid: 1" in t5_section


# --- prune ----------------------------------------------------------------------------------------


def test_prune_dry_run_lists_then_prune_removes_an_image_that_left_the_list(prepared, cli, photo_site):
    layout = prepared.layout
    gone = prepared.ids[4]
    photo_site.publish([i for i in prepared.ids if i != gone], page_size=PAGE_SIZE)
    before = data_tree(layout)

    dry = cli("prune", "--dry-run", "--max-fraction", "0.5")

    assert dry.code == 0, dry.err
    assert "Summary (dry run: nothing was deleted):" in dry.err
    assert dry.summary("Discovery Results:")["Removed ids:"] == "1"
    assert dry.summary("Summary (dry run: nothing was deleted):")["Total .npy files deleted:"] == "3"
    assert {k: v for k, v in data_tree(layout).items() if "photo_list" not in k} == {
        k: v for k, v in before.items() if "photo_list" not in k
    }

    pruned = cli("prune", "--max-fraction", "0.5")

    assert pruned.code == 0, pruned.err
    assert pruned.summary()["JSONL records removed:"] == "1"
    assert not any(p.exists() or p.is_symlink() for p in layout.derived_paths(gone))
    assert not layout.raw_path(gone).exists()
    assert gone not in dataset_ids(layout) and len(dataset_ids(layout)) == IMAGES - 1
    assert all(path.is_file() for path in artefact_files(layout, prepared.ids[0]))


SEED_PRUNE_LABELS = (
    "Broken symlinks deleted:", "JSONL records removed:", "DINOv3 embeddings deleted:", "VAE latents deleted:",
    "T5 hidden states deleted:", "Total .npy files deleted:",
)


def test_sync_prune_removes_what_left_the_list_with_the_seed_summary(prepared, cli, photo_site):
    gone = prepared.ids[-1]
    photo_site.publish(prepared.ids[:-1], page_size=PAGE_SIZE)

    result = cli("sync", "--prune", PHOTOSET_PRUNE_MAX_FRACTION="0.5")

    assert result.code == 0, result.err
    prune_summary = result.err.split("Discovery Results:")[1]
    labels = [line.strip().split(":")[0] + ":" for line in prune_summary.splitlines() if line.startswith("  ")]
    assert [label for label in labels if label in SEED_PRUNE_LABELS] == list(SEED_PRUNE_LABELS)
    assert "JSONL records removed:       1" in prune_summary
    assert not prepared.layout.raw_path(gone).exists()
    assert dataset_ids(prepared.layout) == prepared.ids[:-1]


def test_prune_refuses_to_empty_the_dataset_when_the_list_comes_back_empty(prepared, cli, photo_site):
    photo_site.publish([])

    result = cli("prune")

    assert_one_error(result, 4, "force")
    assert len(list(prepared.layout.approved_dir.iterdir())) == IMAGES
    assert dataset_ids(prepared.layout) == prepared.ids


def test_prune_default_guard_refuses_more_than_a_tenth(prepared, cli, photo_site):
    photo_site.publish(prepared.ids[:-1], page_size=PAGE_SIZE)  # 1 of 7 = 14% > 10%

    result = cli("prune")

    assert_one_error(result, 4, "refusing to remove 1 of 7", "force")
    assert prepared.layout.raw_path(prepared.ids[-1]).exists()


# --- migrate --------------------------------------------------------------------------------------


def test_migrate_built_the_dataset_jsonl(prepared):
    err = prepared.outputs["migrate"].err
    assert f"dataset: {IMAGES} ready records" in err
    records = [json.loads(line) for line in prepared.layout.dataset_jsonl.read_text().splitlines()]
    assert all(r["format_version"] == 2 and "dinov3_embedding" not in r for r in records)


def test_a_recipe_change_never_empties_the_dataset_or_the_shards_silently(prepared, cli):
    layout = prepared.layout
    assert cli("shards").code == 0
    jsonl, shards = layout.dataset_jsonl.read_bytes(), data_tree(layout)

    refused = cli("migrate", PHOTOSET_T5_MAX_LENGTH="512")  # another recipe: every T5 array is stale

    assert_one_error(refused, 4, f"{IMAGES} of its {IMAGES} records would be dropped", "t5.max_length 77 -> 512",
                     "--force")
    assert layout.dataset_jsonl.read_bytes() == jsonl
    forced = cli("migrate", "--force", PHOTOSET_T5_MAX_LENGTH="512")
    assert forced.code == 0, forced.err
    assert dataset_ids(layout) == []

    kept = cli("shards", PHOTOSET_T5_MAX_LENGTH="512")  # the shards were written with 77: refused, named
    assert_one_error(kept, 4, "refusing to shrink", "t5.max_length 77 -> 512")
    assert {path: entry for path, entry in data_tree(layout).items() if "shards" in path} == {
        path: entry for path, entry in shards.items() if "shards" in path}
    assert cli("shards", "--force", PHOTOSET_T5_MAX_LENGTH="512").code == 0
    assert not list(layout.shards_dir.glob("bucket_*/shard-*.tar"))


def test_migrate_dry_run_on_a_stage1_jsonl_reports_and_changes_nothing(cli, data_layout):
    data_layout.ensure_dirs()
    rng = np.random.default_rng(0)
    lines = []
    for index, image_id in enumerate(["stage1a", "stage1b", "stage1c"]):
        if index < 2:  # the third has no raw file: it would not be fully imported
            data_layout.raw_path(image_id).write_bytes(image_bytes("PNG", (32, 48), seed=index))
        lines.append(json.dumps({
            "image_path": f"data/approved/{image_id}.png",
            "caption": f"a photo number {index}",
            "dinov3_embedding": rng.standard_normal(1024).astype(float).tolist(),
            "height": 48,
            "width": 32,
        }))
    data_layout.dataset_jsonl.write_text("\n".join(lines) + "\n")
    before = data_tree(data_layout)

    result = cli("migrate", "--dry-run")

    assert result.code == 0, result.err
    assert "stage1 migration: would migrate 2, already stage 2: 0, failed: 1" in result.out
    assert "failed stage1c: raw file missing" in result.out
    assert data_tree(data_layout) == before


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        ([], ["required: COMMAND"]),
        (["sync", "--limit", "-1"], ["--limit", "-1 must be >= 0"]),
        (["sync", "--limit", "many"], ["'many' is not an integer"]),
        (["prune", "--max-fraction", "2"], ["--max-fraction", "2 must be between 0 and 1"]),
        (["generate", "--pass", "gpu"], ["--pass", "invalid choice: 'gpu'"]),
    ],
)
def test_usage_errors_are_one_line_exit_2(cli, argv, fragments):
    result = cli(*argv)

    assert_one_error(result, 2, *fragments)
    assert len(result.err.splitlines()) == 1, result.err


def test_help_exits_0(cli):
    result = cli("sync", "--help")

    assert result.code == 0
    assert "--stop-after-links" in result.out


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"PHOTOSET_RETRIES": "abc"}, ["PHOTOSET_RETRIES='abc'", "int"]),
        ({"PHOTOSET_VAE_LATENT": "bogus"}, ["PHOTOSET_VAE_LATENT='bogus'", "expected one of mode, sample"]),
        ({"PHOTOSET_DINOV3_PATCH_TOKENS": "maybe"}, ["PHOTOSET_DINOV3_PATCH_TOKENS='maybe'"]),
        ({"PHOTOSET_INSTANCE": "oracle", "DAGSTER_HOME": ""}, ["PHOTOSET_INSTANCE='oracle'", "sqlite, postgres"]),
    ],
)
def test_bad_configuration_is_one_line_naming_the_variable_exit_2(cli, ids, data_layout, env, fragments):
    result = cli("sync", **env)

    assert_one_error(result, 2, *fragments)
    assert len(result.err.splitlines()) == 1, result.err
    assert not data_layout.raw_dir.exists()


def test_an_unreachable_photo_api_is_one_error_line_exit_1(cli, data_layout):
    url = f"http://127.0.0.1:{closed_port()}/photos.json"

    result = cli("sync", PHOTOSET_PHOTOS_URL=url, PHOTOSET_RETRIES="0")

    assert_one_error(result, 1, "could not fetch the photo list", "Connection refused")
    assert not data_layout.approved_dir.exists() or not any(data_layout.approved_dir.iterdir())

    pruned = cli("prune", PHOTOSET_PHOTOS_URL=url, PHOTOSET_RETRIES="0")

    assert_one_error(pruned, 1, "incomplete", "nothing pruned")


def test_an_unreachable_photo_api_fails_a_dry_run_too(cli, data_layout):
    url = f"http://127.0.0.1:{closed_port()}/photos.json"
    data_layout.root.mkdir(parents=True)

    result = cli("sync", "--dry-run", PHOTOSET_PHOTOS_URL=url, PHOTOSET_RETRIES="0")

    assert_one_error(result, 1, "could not fetch the photo list", "Connection refused")


def test_a_photo_list_failing_midway_syncs_what_was_listed_and_exits_1(cli, ids, photo_site, data_layout):
    from photoset_dagster.demo.server import Fault

    photo_site.server.add_fault("/photos.json?page=2", Fault("status", status=503, times=-1))

    result = cli("sync", PHOTOSET_RETRIES="0")

    assert_one_error(result, 1, "the photo list is incomplete", f"synced only the {PAGE_SIZE} photos")
    assert len(list(data_layout.approved_dir.iterdir())) == PAGE_SIZE


def test_an_unexpected_error_is_one_line_and_verbose_shows_its_traceback(cli, tmp_path, data_layout):
    not_a_folder = tmp_path / "home-is-a-file"
    not_a_folder.write_text("")
    data_layout.root.mkdir(parents=True)

    result = cli("verify", DAGSTER_HOME=str(not_a_folder))

    assert_one_error(result, 1, "FileExistsError", "photoset -v")

    verbose = cli("-v", "verify", DAGSTER_HOME=str(not_a_folder))

    assert verbose.code == 1
    assert "Traceback" in verbose.err and len(verbose.error_lines) == 1


def test_verbose_also_prints_dagsters_engine_events(prepared, cli):
    quiet = cli("verify", "--pass", "facts")
    loud = cli("-v", "verify", "--pass", "facts")

    assert quiet.code == loud.code == 0, loud.err
    assert 'Started execution of step "verify"' in loud.err
    assert "Started execution" not in quiet.err
    assert "=== Stage 2 Data Verification ===" in quiet.err


# --- dev and demo -------------------------------------------------------------------------------------


def test_dev_demo_without_a_demo_is_one_line_exit_2(cli, data_layout):
    result = cli("dev", "--demo")

    assert_one_error(result, 2, "profile 'demo'", "photoset demo")


def test_demo_runs_the_whole_pipeline(cli, tmp_path):
    root = tmp_path / "demo-data"

    result = cli("demo", "--photos", "4", PHOTOSET_DATA_ROOT=str(root))

    assert result.code == 0, result.err
    assert "Traceback" not in result.err and not result.error_lines
    layout = DataLayout(root)
    links = sorted(layout.approved_dir.iterdir())
    assert len(links) == 6 and all(link.resolve().is_file() for link in links)
    image_ids = [link.stem for link in links]
    for image_id in image_ids:
        assert all(path.is_file() for path in artefact_files(layout, image_id)), image_id
    assert sorted(dataset_ids(layout)) == sorted(image_ids)
    assert list(layout.shards_dir.glob("bucket_*/shard-*.tar"))
    assert "approved links:   6 of 6 good demo photos" in result.err
    assert (layout.reports_dir / "dataset_report.html").is_file() and "report:" in result.out
    # The demo's settings are a profile every later command reads: no environment needed.
    settings = Path(os.environ["PHOTOSET_SETTINGS"]).read_text()
    assert 'profile = "demo"' in settings and str(root) in settings
    unset = {name: "" for name in cli.env if name.startswith("PHOTOSET_") and name != "PHOTOSET_SETTINGS"}
    verify = cli("verify", **unset)
    assert verify.code == 0, verify.err


# --- the console script ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "code", "fragment"),
    [
        (["sync"], {"PHOTOSET_RETRIES": "0", "PHOTOSET_PHOTOS_URL": "closed"}, 1, "could not fetch the photo list"),
        (["frobnicate"], {}, 2, "invalid choice"),
    ],
)
def test_the_console_script_shows_no_traceback(cli_env, tmp_path, argv, env, code, fragment):
    env = {**cli_env, **env}
    if env.get("PHOTOSET_PHOTOS_URL") == "closed":
        env["PHOTOSET_PHOTOS_URL"] = f"http://127.0.0.1:{closed_port()}/photos.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PHOTOSET_", "DAGSTER_HOME"))}

    done = subprocess.run(
        [str(PHOTOSET_SCRIPT), *argv], env={**clean, **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )

    assert_one_error(Outcome(done.returncode, done.stdout, done.stderr), code, fragment)
