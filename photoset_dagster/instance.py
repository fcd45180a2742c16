"""The project's Dagster instance: DAGSTER_HOME defaults to .dagster_home/ in the project, and photoset
writes its dagster.yaml from the project's dagster.yaml (SQLite) or, with PHOTOSET_INSTANCE=postgres,
from deploy/postgres/dagster.yaml, sizing the ``gpu`` pool to the GPUs this machine shows. The CLI,
the demo and `photoset dev` all use this one instance, so runs started anywhere show up in the web UI.
A DAGSTER_HOME of the user's own gets the same file only when it has none (telemetry off, so a fresh
home prints no banner)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

INSTANCE_CONFIGS = {"sqlite": Path("dagster.yaml"), "postgres": Path("deploy/postgres/dagster.yaml")}
_GENERATED = "# Written by photoset from {template}; edit that file (or set DAGSTER_HOME to a home of your own).\n"


class InstanceConfigError(ValueError):
    pass


def project_root() -> Path:
    """The folder holding dagster.yaml: the source checkout, else the current directory."""
    source_root = Path(__file__).resolve().parents[1]
    return source_root if (source_root / "dagster.yaml").is_file() else Path.cwd()


# photoset's SQLite event log (instance_storage.py), for homes on SQLite (a template that names no storage).
_EVENT_LOG = {"module": "photoset_dagster.instance_storage", "class": "PhotosetSqliteEventLogStorage",
              "config": {"dagster_home": {"env": "DAGSTER_HOME"}}}


def instance_yaml(template: Path, gpus: int) -> str:
    config = yaml.safe_load(template.read_text()) or {}
    pools = config.setdefault("concurrency", {}).setdefault("pools", {})
    pools["default_limit"] = max(1, gpus)
    if "storage" not in config and "event_log_storage" not in config:  # the SQLite template
        config["event_log_storage"] = _EVENT_LOG
    return _GENERATED.format(template=template) + yaml.safe_dump(config, sort_keys=False)


def prepare_dagster_home(env: dict[str, str] | None = None) -> Path:
    """Set DAGSTER_HOME (unless the user did) and make sure it has a dagster.yaml; returns it."""
    from .defs.concurrency import visible_gpu_count

    env = os.environ if env is None else env
    kind = env.get("PHOTOSET_INSTANCE", "sqlite")
    if kind not in INSTANCE_CONFIGS:
        raise InstanceConfigError(f"PHOTOSET_INSTANCE={kind!r}: choose one of {', '.join(INSTANCE_CONFIGS)}")
    template = project_root() / INSTANCE_CONFIGS[kind]
    if not template.is_file():
        raise InstanceConfigError(f"{template} not found (run photoset from the project folder)")
    own_home = bool(env.get("DAGSTER_HOME"))
    home = Path(env["DAGSTER_HOME"]) if own_home else project_root() / ".dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if target.is_symlink():  # the first landing linked it; now it is written
        target.unlink()
    if not (own_home and target.exists()):
        wanted = instance_yaml(template, visible_gpu_count())
        if not target.exists() or target.read_text() != wanted:
            target.write_text(wanted)
    env["DAGSTER_HOME"] = str(home)
    return home
