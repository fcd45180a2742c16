"""Dagster's SQLite event log, made cheap enough to record one event per image.

Dagster 1.13's ``SqliteEventLogStorage`` creates a SQLAlchemy engine for every statement, opens and
closes a connection each time (closing the last connection of a WAL database checkpoints it), and
compiles each statement afresh: about 10-14 ms per per-partition materialization on a 2-core machine,
more than a photo takes to download. This subclass keeps one engine and one connection per database
file (a few, least recently used first to go), runs the WAL journal with ``synchronous=NORMAL`` (durable
across a killed process; an OS crash may lose the last few events, never corrupt the file), and writes
an event batch in one transaction per database. The schema, the files and every reader are Dagster's
own: the web UI and the daemon read the same databases, with or without this class.

Configured in the instance's ``dagster.yaml`` (``photoset`` writes it into ``.dagster_home``)::

    event_log_storage:
      module: photoset_dagster.instance_storage
      class: PhotosetSqliteEventLogStorage
      config:
        dagster_home: {env: DAGSTER_HOME}   # the files go where Dagster's default SQLite puts them
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from dagster import Field, StringSource
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool
from watchdog.events import PatternMatchingEventHandler
from watchdog.observers import Observer

# Open databases kept at once: the index, and the shards of the runs writing now.
MAX_OPEN_SHARDS = 16


class PhotosetSqliteEventLogStorage(SqliteEventLogStorage):
    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._tables: set[str] = set()
        super().__init__(base_dir, inst_data)

    @classmethod
    def config_type(cls) -> Any:
        return {"dagster_home": Field(StringSource, is_required=True)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> PhotosetSqliteEventLogStorage:
        # The layout of Dagster's default SQLite instance: the same files with or without this class.
        return cls(os.path.join(config_value["dagster_home"], "history", "runs"), inst_data=inst_data)

    def _engine(self, shard: str) -> Engine:
        engine = self._engines.get(shard)
        if engine is not None:
            self._engines.move_to_end(shard)
            return engine
        engine = create_engine(
            self.conn_string_for_shard(shard),
            poolclass=StaticPool,  # one connection, reused; access is serialized by self._db_lock
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _tune_connection)
        if shard not in self._initialized_dbs:
            self._initdb(engine)
            self._initialized_dbs.add(shard)
        self._engines[shard] = engine
        while len(self._engines) > MAX_OPEN_SHARDS:
            self._engines.popitem(last=False)[1].dispose()
        return engine

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            with self._engine(shard).connect() as conn:
                with conn.begin():
                    yield conn

    def has_table(self, table_name: str) -> bool:
        # Asked on every asset event; tables only ever appear (a migration), so a yes is kept.
        if table_name not in self._tables and super().has_table(table_name):
            self._tables.add(table_name)
        return table_name in self._tables

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """One transaction per database for a batch (Dagster's SQLite storage writes event by event)."""
        asset_entries = [e for e in events if e.is_dagster_event and e.dagster_event_type in ASSET_EVENTS]
        for entry in events:
            if not (entry.is_dagster_event and entry.dagster_event_type in ASSET_EVENTS):
                self.store_event(entry)  # check-planned events and the like: stored as Dagster does
        for run_id, group in itertools.groupby(asset_entries, key=lambda entry: entry.run_id):
            entries = list(group)
            with self.run_connection(run_id) as conn:
                conn.execute(SqlEventLogStorageTable.insert(), [self._event_to_row(entry) for entry in entries])
            with self.index_transaction() as conn:
                ids = [conn.execute(self.prepare_insert_event(entry)).inserted_primary_key[0] for entry in entries]
                self._store_asset_event_tags(conn, entries, ids)
                for entry, event_id in zip(entries, ids):
                    self._store_asset_event(conn, entry, event_id)

    def watch(self, run_id: str, cursor: str | None, callback: Any) -> None:
        """Dagster's watcher follows the run's ``.db`` file, which a WAL database only touches at a
        checkpoint (Dagster's storage forces one by closing its connection after every event); this one
        follows the write-ahead log too, so the web UI's live run log keeps up."""
        if not self._obs:
            self._obs = Observer()
            self._obs.start()
        watchdog = _WalWatchdog(self, run_id, callback, cursor)
        self._watchers[run_id][callback] = (watchdog, self._obs.schedule(watchdog, self._base_dir, recursive=True))

    def wipe(self) -> None:
        self._close_all()
        super().wipe()

    def dispose(self) -> None:
        self._close_all()
        super().dispose()

    def _close_all(self) -> None:
        with self._db_lock:
            while self._engines:
                self._engines.popitem()[1].dispose()


class _WalWatchdog(SqliteEventLogStorageWatchdog):
    def __init__(self, storage: SqliteEventLogStorage, run_id: str, callback: Any, cursor: str | None) -> None:
        path = storage.path_for_shard(run_id)
        PatternMatchingEventHandler.__init__(self, patterns=[path, f"{path}-wal"])
        self._event_log_storage = storage
        self._run_id = run_id
        self._cb = callback
        self._log_path = path
        self._cursor = cursor

    def on_modified(self, event: Any) -> None:
        self._process_log()


def _tune_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
