"""The project's Dagster instance: DAGSTER_HOME defaults to .dagster_home/ in the project, holding a
link to the project's dagster.yaml (SQLite) or, with PHOTOSET_INSTANCE=postgres, to
deploy/postgres/dagster.yaml. The CLI, the demo and `photoset dev` all use this one instance, so
runs started anywhere show up in the web UI."""

from __future__ import annotations

import os
from pathlib import Path

INSTANCE_CONFIGS = {"sqlite": Path("dagster.yaml"), "postgres": Path("deploy/postgres/dagster.yaml")}


class InstanceConfigError(ValueError):
    pass


def project_root() -> Path:
    """The folder holding dagster.yaml: the source checkout, else the current directory."""
    source_root = Path(__file__).resolve().parents[1]
    return source_root if (source_root / "dagster.yaml").is_file() else Path.cwd()


def prepare_dagster_home(env: dict[str, str] | None = None) -> Path:
    """Set DAGSTER_HOME (unless the user did) and make sure it has a dagster.yaml; returns it."""
    env = os.environ if env is None else env
    if env.get("DAGSTER_HOME"):
        home = Path(env["DAGSTER_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        return home
    kind = env.get("PHOTOSET_INSTANCE", "sqlite")
    if kind not in INSTANCE_CONFIGS:
        raise InstanceConfigError(f"PHOTOSET_INSTANCE={kind!r}: choose one of {', '.join(INSTANCE_CONFIGS)}")
    root = project_root()
    config = root / INSTANCE_CONFIGS[kind]
    if not config.is_file():
        raise InstanceConfigError(f"{config} not found (run photoset from the project folder)")
    home = root / ".dagster_home"
    home.mkdir(exist_ok=True)
    link = home / "dagster.yaml"
    target = os.path.relpath(config, home)
    if not (link.is_symlink() and os.readlink(link) == target):
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)
    env["DAGSTER_HOME"] = str(home)
    return home
