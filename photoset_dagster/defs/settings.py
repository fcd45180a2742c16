"""One configuration for every process: the CLI, the web UI, the daemon, every run worker and
``dagster asset materialize`` all build their resources from the same settings, in this order:

1. the defaults in the code;
2. the project settings file, ``photoset.toml`` beside ``dagster.yaml`` (or ``$PHOTOSET_SETTINGS``):
   its top-level tables, then the tables of the active profile (``profile = "demo"``, or
   ``$PHOTOSET_PROFILE``);
3. ``PHOTOSET_*`` environment variables (for one shell or one machine);
4. a run's own config in the launchpad (per run).

Keys are ``<resource>.<field>`` (``t5.max_length``, ``photoset.data_root``); ``models.<field>`` sets a
field of every model resource (``models.device``). ``photoset config`` prints every effective value
and where it came from. Secrets are never settings: the API key is read from the environment variable
the settings *name*, when the model loads, so it never reaches run config, logs or the UI.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..instance import project_root

SETTINGS_FILE = "photoset.toml"
MODELS_SECTION = "models"
AUTOMATION_SECTION = "automation"

# Environment variables kept from the seed's and the first landing's documentation: name -> key.
ENV_NAMES: dict[str, str] = {
    "PHOTOSET_DATA_ROOT": "photoset.data_root",
    "PHOTOSET_PHOTOS_URL": "photoset.photos_url",
    "PHOTOSET_ALLOW_HTTP": "photoset.allow_http",
    "PHOTOSET_TIMEOUT_S": "photoset.timeout_s",
    "PHOTOSET_RETRIES": "photoset.retries",
    "PHOTOSET_DOWNLOAD_CONCURRENCY": "photoset.download_concurrency",
    "PHOTOSET_MAX_FILE_BYTES": "photoset.max_file_bytes",
    "PHOTOSET_USER_AGENT": "photoset.user_agent",
    "PHOTOSET_PRUNE_MAX_FRACTION": "photoset.prune_max_fraction",
    "PHOTOSET_MIN_FREE_GB": "photoset.min_free_gb",
    "PHOTOSET_DEVICE": "models.device",
    "PHOTOSET_DEVICES": "models.devices",
    "PHOTOSET_DINOV3_MODEL": "dinov3.model_id",
    "PHOTOSET_DINOV3_REVISION": "dinov3.revision",
    "PHOTOSET_DINOV3_PATCH_TOKENS": "dinov3.patch_tokens",
    "PHOTOSET_DINOV3_DTYPE": "dinov3.dtype",
    "PHOTOSET_DINOV3_BATCH_SIZE": "dinov3.batch_size",
    "PHOTOSET_CAPTION_BACKEND": "captioner.backend",
    "PHOTOSET_CAPTION_MODEL": "captioner.model_id",
    "PHOTOSET_CAPTION_REVISION": "captioner.revision",
    "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "captioner.max_new_tokens",
    "PHOTOSET_CAPTION_DTYPE": "captioner.dtype",
    "PHOTOSET_CAPTION_BATCH_SIZE": "captioner.batch_size",
    "PHOTOSET_OLLAMA_HOST": "captioner.ollama_host",
    "PHOTOSET_OLLAMA_MODEL": "captioner.ollama_model",
    "PHOTOSET_OPENAI_BASE_URL": "captioner.openai_base_url",
    "PHOTOSET_OPENAI_MODEL": "captioner.openai_model",
    "PHOTOSET_CAPTION_CONCURRENCY": "captioner.concurrency",
    "PHOTOSET_VAE_MODEL": "flux_vae.model_id",
    "PHOTOSET_VAE_REVISION": "flux_vae.revision",
    "PHOTOSET_VAE_LATENT": "flux_vae.latent",
    "PHOTOSET_VAE_SCALED": "flux_vae.scaled",
    "PHOTOSET_VAE_INPUT_MODE": "flux_vae.input_mode",
    "PHOTOSET_VAE_DTYPE": "flux_vae.dtype",
    "PHOTOSET_VAE_BATCH_SIZE": "flux_vae.batch_size",
    "PHOTOSET_T5_MODEL": "t5.model_id",
    "PHOTOSET_T5_REVISION": "t5.revision",
    "PHOTOSET_T5_MAX_LENGTH": "t5.max_length",
    "PHOTOSET_T5_DTYPE": "t5.dtype",
    "PHOTOSET_T5_BATCH_SIZE": "t5.batch_size",
    "PHOTOSET_AUTOMATION": "automation.enabled",
    "PHOTOSET_SENSOR_INTERVAL_S": "automation.sensor_interval_s",
    "PHOTOSET_NIGHTLY_CRON": "automation.nightly_cron",
}
ENV_BY_KEY = {key: name for name, key in ENV_NAMES.items()}


class ConfigError(ValueError):
    """Bad configuration: the message names the setting, where it came from and what it expects."""


@dataclass(frozen=True)
class Setting:
    key: str
    annotation: Any
    default: Any


@dataclass
class EffectiveSettings:
    values: dict[str, Any]  # key -> value, every known setting
    sources: dict[str, str]  # key -> "default", "photoset.toml", "photoset.toml [profile demo]", "env NAME"
    path: Path
    profile: str | None
    file_found: bool = False
    unknown: list[str] = field(default_factory=list)  # keys in the file that name no setting

    def section(self, name: str) -> dict[str, Any]:
        prefix = name + "."
        return {key[len(prefix):]: value for key, value in self.values.items() if key.startswith(prefix)}

def settings_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("PHOTOSET_SETTINGS") or project_root() / SETTINGS_FILE)


def known_settings() -> dict[str, Setting]:
    """Every setting: each field of each resource, the shared model fields, and automation."""
    from .resources import MODEL_RESOURCE_KEYS, RESOURCE_CLASSES

    specs: dict[str, Setting] = {}
    for name, cls in RESOURCE_CLASSES.items():
        for field_name, info in cls.model_fields.items():
            specs[f"{name}.{field_name}"] = Setting(f"{name}.{field_name}", info.annotation, info.default)
    shared = RESOURCE_CLASSES[MODEL_RESOURCE_KEYS[0]].model_fields
    for field_name in ("device", "devices"):
        specs[f"{MODELS_SECTION}.{field_name}"] = Setting(f"{MODELS_SECTION}.{field_name}",
                                                          shared[field_name].annotation, None)
    for key, (annotation, default) in AUTOMATION_SETTINGS.items():
        specs[key] = Setting(key, annotation, default)
    return specs


AUTOMATION_SETTINGS: dict[str, tuple[Any, Any]] = {
    "automation.enabled": (bool, False),  # start the sensor and the nightly schedule running
    "automation.sensor_interval_s": (int, 600),
    "automation.nightly_cron": (str, "0 2 * * *"),
}


def load_settings(env: Mapping[str, str] | None = None, *, profile: str | None = None) -> EffectiveSettings:
    """The effective settings for this process: defaults < file < active profile < environment."""
    env = os.environ if env is None else env
    path = settings_path(env)
    specs = known_settings()
    values = {key: spec.default for key, spec in specs.items()}
    sources = {key: "default" for key in specs}
    effective = EffectiveSettings(values, sources, path, None)
    document = _read_file(path)
    requested = profile or env.get("PHOTOSET_PROFILE")
    if document is None and requested:
        raise ConfigError(f"profile {requested!r} asked for, but there is no settings file {path} "
                          "(`photoset demo` writes the demo profile)")
    if document is not None:
        effective.file_found = True
        chosen = requested or document.get("profile")
        profiles = document.get("profiles") or {}
        if chosen is not None and chosen not in profiles:
            raise ConfigError(f"{path}: profile {chosen!r} is not defined (profiles: {', '.join(profiles) or 'none'})")
        effective.profile = chosen
        base = {name: table for name, table in document.items() if name not in ("profile", "profiles")}
        layers = [(base, path.name)]
        if chosen is not None:
            layers.append((profiles[chosen], f"{path.name} [profile {chosen}]"))
        for tables, source in layers:
            for key, value in _flatten(tables, path):
                if key not in specs:
                    effective.unknown.append(key)
                    continue
                values[key] = _coerce(specs[key], value, f"{key} in {source}")
                sources[key] = source
        if effective.unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(effective.unknown))} "
                              "(`photoset config` lists them all)")
    for name, key in ENV_NAMES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        values[key] = _coerce(specs[key], raw, f"{name}={raw!r}")
        sources[key] = f"env {name}"
    # A relative data root is the settings file's neighbour for every process (CLI, webserver, daemon,
    # run workers), whatever folder each was started in.
    values["photoset.data_root"] = str(path.parent / values["photoset.data_root"])
    return effective


def _read_file(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the settings file: {error}") from None


def _flatten(tables: Mapping[str, Any], path: Path) -> list[tuple[str, Any]]:
    flat = []
    for section, table in tables.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{path}: {section!r} must be a table like [{section}] (got {table!r})")
        flat += [(f"{section}.{name}", value) for name, value in table.items()]
    return flat


def _coerce(spec: Setting, value: Any, where: str) -> Any:
    """``value`` (from TOML or an environment string) as the setting's type, or a ConfigError."""
    annotation = spec.annotation
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            return _bool(value)
        if annotation is int and not isinstance(value, bool):
            return int(value)
        if annotation is float and not isinstance(value, bool):
            return float(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(item).strip() for item in items if str(item).strip()]
        if origin is typing.Literal:
            allowed = typing.get_args(annotation)
            if value not in allowed:
                raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
            return value
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError("expected text")
            return value
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error if 'expected' in str(error) else f'expected {_type_name(annotation)}'}"
                          ) from None
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


# --- writing a profile (the demo) --------------------------------------------------------------------


def write_profile(path: Path, name: str, values: Mapping[str, Any], *, activate: bool = True) -> None:
    """Set profile ``name`` to ``values`` (key -> value) in the settings file, keeping everything else,
    and make it the active profile. Written atomically."""
    from ..core.atomic import atomic_write_text

    document = _read_file(path) or {}
    profiles = dict(document.get("profiles") or {})
    tables: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, field_name = key.partition(".")
        tables.setdefault(section, {})[field_name] = value
    profiles[name] = tables
    document["profiles"] = profiles
    if activate:
        document["profile"] = name
    atomic_write_text(path, _dump(document))


def set_active_profile(path: Path, name: str | None) -> None:
    from ..core.atomic import atomic_write_text

    document = _read_file(path) or {}
    if name is not None and name not in (document.get("profiles") or {}):
        raise ConfigError(f"{path}: profile {name!r} is not defined")
    if name is None:
        document.pop("profile", None)
    else:
        document["profile"] = name
    atomic_write_text(path, _dump(document))


_HEADER = (
    "# photoset settings: read by the CLI, the web UI, the daemon and every run alike.\n"
    "# Order: code defaults < top-level tables here < the active profile < PHOTOSET_* environment\n"
    "# variables < a run's launchpad config. `photoset config` shows every value and its source.\n"
)


def _dump(document: Mapping[str, Any]) -> str:
    """TOML for the shapes this file holds: an optional ``profile`` string, top-level tables of
    scalars, and ``profiles.<name>.<section>`` tables."""
    lines = [_HEADER]
    if "profile" in document:
        lines.append(f"profile = {_toml_value(document['profile'])}\n")
    for section, table in document.items():
        if section in ("profile", "profiles"):
            continue
        lines.append(f"\n[{section}]\n")
        lines += [f"{key} = {_toml_value(value)}\n" for key, value in table.items()]
    for profile, tables in (document.get("profiles") or {}).items():
        for section, table in tables.items():
            lines.append(f"\n[profiles.{profile}.{section}]\n")
            lines += [f"{key} = {_toml_value(value)}\n" for key, value in table.items()]
    return "".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
