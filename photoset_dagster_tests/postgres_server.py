"""A throwaway PostgreSQL server on 127.0.0.1 (trust auth, fsync off), for the Postgres instance test
and ``bench/orchestration.py``: ``with throwaway_postgres() as server: server.instance_env()``."""

from __future__ import annotations

import contextlib
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


def _as_postgres() -> list[str] | None:
    """Command prefix that runs a binary as the postgres user (initdb/postgres refuse to run as root);
    None when that is impossible."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    return [runuser, "-u", PG_USER, "--"] if runuser else None


def postgres_unavailable() -> str | None:
    """Why no throwaway server can start here, or None."""
    if _pg_bindir() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql, or ./tasks.sh test as root)"
    if _as_postgres() is None:
        return "running as root without runuser: cannot start PostgreSQL as the postgres user"
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
    as_postgres: list[str]

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
        if done.returncode != 0:
            raise RuntimeError(f"createdb failed: {done.stderr}\n{self.log_tail()}")
        return name

    def instance_env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables deploy/postgres/dagster.yaml reads, for a new database."""
        return {"DAGSTER_PG_USERNAME": self.user, "DAGSTER_PG_PASSWORD": "unused-trust-auth",
                "DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": self.create_database()}


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[PostgresServer]:
    """Start a server (check :func:`postgres_unavailable` first); always stopped and deleted."""
    bindir, as_postgres = _pg_bindir(), _as_postgres()
    if bindir is None or as_postgres is None:
        raise RuntimeError(postgres_unavailable())
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
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
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
        if start.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {start.stdout}{start.stderr}\n{server.log_tail()}")
        yield server
    finally:
        if started:
            stop = server.run("pg_ctl", "-D", str(server.datadir), "-m", "immediate", "-w", "stop")
            if stop.returncode != 0:
                print(f"pg_ctl stop: {stop.stdout}{stop.stderr}")
        shutil.rmtree(datadir, ignore_errors=True)
