"""The Postgres instance (deploy/postgres/dagster.yaml) against a real PostgreSQL server started for
this module: the photo-list sensor registers partitions there, a range run of the cheap stages
records its materializations there, and a second instance opened from the same config sees it all.

Skipped only when the PostgreSQL server binaries are missing (`apt-get install postgresql`;
./tasks.sh test installs them when run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from photoset_dagster.defs.partitions import IMAGE_ID_PARTITIONS_NAME
from photoset_dagster_tests.fixtures_dagster import build_defs, materialize_range

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_CONFIG = REPO_ROOT / "deploy" / "postgres" / "dagster.yaml"
PG_USER = "postgres"
START_TIMEOUT_S = 30


def _pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL server (/usr/lib/postgresql/<major>/bin), else one on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name), reverse=True
    )
    if candidates:
        return Path(candidates[0]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    port: int
    as_postgres: list[str]  # command prefix that runs a binary as the server's owner

    host = "127.0.0.1"
    user = PG_USER

    def run(self, binary: str, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_postgres, str(self.bindir / binary), *args],
            capture_output=True, text=True, timeout=timeout, cwd="/",  # cwd: root's cwd may be unreadable to postgres
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.datadir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"

    def create_database(self) -> str:
        name = f"photoset_{uuid.uuid4().hex[:12]}"
        done = self.run("createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, name)
        assert done.returncode == 0, f"createdb failed: {done.stderr}\n{self.log_tail()}"
        return name


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>, trust auth, fsync off; always stopped."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql, or ./tasks.sh test as root)")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb/postgres refuse to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
        as_postgres = [runuser, "-u", PG_USER, "--"]
    # Not under pytest's tmp_path: that is root-only (0700) when running as root.
    datadir = Path(tempfile.mkdtemp(prefix="photoset-pg-"))
    if as_postgres:
        shutil.chown(datadir, user=PG_USER)
    server = PostgresServer(bindir, datadir / "data", _free_port(), as_postgres)
    started = False
    try:
        init = server.run(
            "initdb", "-D", str(server.datadir), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
            timeout=120,
        )
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        options = (
            f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={server.datadir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        start = server.run(
            "pg_ctl", "-D", str(server.datadir), "-l", str(server.datadir / "server.log"),
            "-w", "-t", str(START_TIMEOUT_S), "-o", options, "start",
            timeout=START_TIMEOUT_S + 10,
        )
        started = True  # pg_ctl may have started it even when it reports a failure; stop it regardless
        assert start.returncode == 0, f"pg_ctl start failed: {start.stdout}{start.stderr}\n{server.log_tail()}"
        yield server
    finally:
        if started:
            stop = server.run("pg_ctl", "-D", str(server.datadir), "-m", "immediate", "-w", "stop")
            if stop.returncode != 0:
                print(f"pg_ctl stop: {stop.stdout}{stop.stderr}")
        shutil.rmtree(datadir, ignore_errors=True)


def _open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


@pytest.fixture
def pg_instance(postgres_server: PostgresServer, tmp_path: Path, monkeypatch) -> Iterator[dg.DagsterInstance]:
    """A DagsterInstance from deploy/postgres/dagster.yaml on a fresh database of the test server."""
    monkeypatch.setenv("DAGSTER_PG_USERNAME", postgres_server.user)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-trust-auth")
    monkeypatch.setenv("DAGSTER_PG_HOST", postgres_server.host)
    monkeypatch.setenv("DAGSTER_PG_PORT", str(postgres_server.port))
    monkeypatch.setenv("DAGSTER_PG_DB", postgres_server.create_database())
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PG_CONFIG, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = _open_instance(home)
    try:
        yield instance
    finally:
        instance.dispose()


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def("photo_list_sensor")
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"photoset": defs.resources["photoset"]}
    )
    return sensor.evaluate_tick(context)


def test_instance_config_selects_postgres_storage(pg_instance):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(pg_instance.schedule_storage, PostgresScheduleStorage)
    # The rest of the file is honoured too (the gpu pool, run monitoring).
    assert pg_instance.run_monitoring_enabled
    assert pg_instance.global_op_concurrency_default_limit == 1


def test_sensor_registers_partitions_and_a_range_run_records_materializations(pg_instance, photoset_env, photo_site):
    ids = photo_site.add_images(8)
    photo_site.publish(ids, page_size=3)
    defs = build_defs(photoset_env)

    # (a) The sensor tick, as the daemon runs it: ids registered in bulk, one range run requested.
    first = tick(defs, pg_instance)
    assert pg_instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
    ranges = [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in first.run_requests]
    assert ranges == [(ids[0], ids[-1])]
    assert first.cursor

    # (b) What a backfill of that range does for the cheap stages: one run over first..last.
    result = materialize_range(defs, pg_instance, ["approved_links", "image_facts"], ids[0], ids[-1])
    assert result.success
    unchanged = tick(defs, pg_instance, cursor=first.cursor)
    assert not unchanged.run_requests and "unchanged" in unchanged.skip_message
    assert pg_instance.get_materialized_partitions(dg.AssetKey("image_facts")) == set(ids)
    assert pg_instance.get_materialized_partitions(dg.AssetKey("approved_links")) == set(ids)
    run = pg_instance.get_run_by_id(result.run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS

    # Stored in Postgres, not in the process: a second instance from the same config sees it all.
    other = _open_instance(Path(os.environ["DAGSTER_HOME"]))
    try:
        assert other.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == ids
        assert other.get_materialized_partitions(dg.AssetKey("image_facts")) == set(ids)
        assert other.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        record = other.get_latest_materialization_event(dg.AssetKey("image_facts"))
        assert record is not None and record.run_id == result.run_id
    finally:
        other.dispose()

    # A list change on the next tick only adds the new id (the registration is durable).
    added = ids + photo_site.add_images(1, start=len(ids))
    photo_site.publish(added, page_size=3)
    again = tick(defs, pg_instance, cursor=first.cursor)
    assert [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in again.run_requests] == [
        (added[-1], added[-1])
    ]
    assert pg_instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME) == added
