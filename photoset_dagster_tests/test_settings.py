"""One configuration for every process: the settings file, its profiles, the environment over it,
`photoset config`, secrets kept out of Dagster, and the disk preflight."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from photoset_dagster.cli import main
from photoset_dagster.core import preflight
from photoset_dagster.defs.resources import resources_from_env
from photoset_dagster.defs.settings import ConfigError, load_settings, write_profile
from photoset_dagster_tests.fixtures_dagster import build_defs, materialize_range
from photoset_dagster_tests.fixtures_models import Reply


def settings_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "photoset.toml"
    path.write_text(text)
    return {"PHOTOSET_SETTINGS": str(path)}


def test_defaults_then_file_then_profile_then_environment(tmp_path):
    env = settings_file(tmp_path, """
profile = "gpu"
[t5]
max_length = 512
[photoset]
data_root = "/srv/data"
[profiles.gpu.t5]
batch_size = 256
[profiles.gpu.models]
device = "cuda"
""")

    settings = load_settings({**env, "PHOTOSET_T5_BATCH_SIZE": "128"})

    assert settings.values["t5.max_length"] == 512 and settings.sources["t5.max_length"] == "photoset.toml"
    assert settings.values["t5.batch_size"] == 128 and settings.sources["t5.batch_size"] == "env PHOTOSET_T5_BATCH_SIZE"
    assert settings.sources["models.device"] == "photoset.toml [profile gpu]"
    assert settings.values["captioner.max_new_tokens"] == 500 and settings.sources["captioner.max_new_tokens"] == "default"
    resources = resources_from_env({**env})
    assert {resources[key].device for key in ("dinov3", "captioner", "flux_vae", "t5")} == {"cuda"}
    assert resources["photoset"].data_root == "/srv/data"


def test_a_relative_data_root_is_the_settings_files_neighbour_from_any_folder(tmp_path, monkeypatch, capsys):
    env = settings_file(tmp_path, '[photoset]\ndata_root = "dataset"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a daemon or a shell started in another folder

    assert load_settings(env).values["photoset.data_root"] == str(tmp_path / "dataset")
    monkeypatch.setenv("PHOTOSET_SETTINGS", env["PHOTOSET_SETTINGS"])
    monkeypatch.setenv("PHOTOSET_DATA_ROOT", "")  # (restored after the test: the CLI sets it from the flag)
    assert main(["config", "--data-root", "mine"]) == 0  # a flag is the shell's: relative to where it is typed
    assert f"photoset.data_root = '{elsewhere / 'mine'}'" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("text", "fragment"), [
    ('[t5]\nmax_lenght = 512\n', "unknown setting(s) t5.max_lenght"),
    ('[t5]\nmax_length = "long"\n', "t5.max_length in photoset.toml: expected int"),
    ('profile = "nope"\n', "profile 'nope' is not defined"),
    ('[t5\n', "cannot read the settings file"),
])
def test_a_bad_settings_file_is_one_error_naming_the_setting(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as raised:
        load_settings(settings_file(tmp_path, text))
    assert fragment in str(raised.value)


def test_photoset_config_prints_every_setting_and_its_source(tmp_path, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("PHOTOSET_"):
            monkeypatch.delenv(name)
    env = settings_file(tmp_path, '[flux_vae]\nlatent = "sample"\n[t5]\ndtype = "float32"\n')
    monkeypatch.setenv("PHOTOSET_SETTINGS", env["PHOTOSET_SETTINGS"])
    monkeypatch.setenv("PHOTOSET_T5_MAX_LENGTH", "512")

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert "'sample'" in lines["flux_vae.latent"] and lines["flux_vae.latent"].endswith("# photoset.toml")
    assert lines["t5.max_length"].endswith("# env PHOTOSET_T5_MAX_LENGTH")
    assert lines["photoset.data_root"].endswith("# default")
    assert "'auto' (float32)" in lines["dinov3.dtype"] and "'auto' (bfloat16)" in lines["flux_vae.dtype"]
    assert "'float32'" in lines["t5.dtype"] and "(" not in lines["t5.dtype"].split("#")[0]  # no "auto" to resolve
    assert "captioner.openai_api_key_env" in lines and "api_key =" not in out


def test_profiles_are_switched_with_config_use(tmp_path, monkeypatch, capsys):
    path = tmp_path / "photoset.toml"
    monkeypatch.setenv("PHOTOSET_SETTINGS", str(path))
    write_profile(path, "a", {"t5.max_length": 77})
    write_profile(path, "b", {"t5.max_length": 512})
    assert load_settings().values["t5.max_length"] == 512  # the last one written is active

    assert main(["config", "--use", "a"]) == 0

    assert load_settings().values["t5.max_length"] == 77
    assert main(["config", "--use", "missing"]) == 2
    assert "profile 'missing' is not defined" in capsys.readouterr().err


def test_the_api_key_is_used_but_never_reaches_run_config_events_or_the_ui(
    photoset_env, photo_site, instance, caption_server, monkeypatch
):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("PHOTOSET_OPENAI_API_KEY", secret)
    caption_server.default = lambda request: Reply(body={
        "choices": [{"message": {"content": "A test card of gradients."}}], "usage": {"completion_tokens": 6}})
    env = {**photoset_env, "PHOTOSET_CAPTION_BACKEND": "openai",
           "PHOTOSET_OPENAI_BASE_URL": f"{caption_server.url}/v1"}
    ids = photo_site.add_images(2)
    photo_site.publish(ids)
    defs = build_defs(env)
    assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success

    result = materialize_range(defs, instance, ["approved_links", "captions"], ids[0], ids[-1])

    assert result.success
    assert {request.headers["authorization"] for request in caption_server.requests} == {f"Bearer {secret}"}
    run = instance.get_run_by_id(result.run_id)
    stored = json.dumps(run.run_config, default=str) + json.dumps(dict(run.tags))
    stored += "".join(entry.to_json() for entry in instance.all_logs(result.run_id))
    assert secret not in stored
    assert secret not in json.dumps(defs.resources["captioner"].model_dump(), default=str)  # what the UI shows


def test_a_pass_that_would_fill_the_disk_is_refused_before_writing(photoset_env, photo_site, instance, monkeypatch,
                                                                   data_layout):
    ids = photo_site.add_images(3)
    photo_site.publish(ids)
    defs = build_defs({**photoset_env, "PHOTOSET_MIN_FREE_GB": "20"})
    assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success
    assert materialize_range(defs, instance, ["approved_links", "image_facts"], ids[0], ids[-1]).success
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 19 * preflight.GB)  # a nearly full disk

    result = materialize_range(defs, instance, ["vae_latents"], ids[0], ids[-1], raise_on_error=False)

    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "not enough free disk for the vae_latents stage" in str(failure.step_failure_data.error)
    assert "floor is 20 GB (photoset.min_free_gb)" in str(failure.step_failure_data.error)
    assert not list(data_layout.kind_dir("vae_latents").iterdir())
