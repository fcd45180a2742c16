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
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from dagster import Field, StringSource
from dagster._core.events import ASSET_EVENTS, DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._serdes import ConfigurableClassData, serialize_value
from dagster_postgres.event_log.event_log import PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
from sqlalchemy import bindparam, create_engine, event, func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool
from watchdog.events import PatternMatchingEventHandler
from watchdog.observers import Observer

# Open databases kept at once: the index, and the shards of the runs writing now.
MAX_OPEN_SHARDS = 16
BATCHED_EVENTS = ASSET_EVENTS | {DagsterEventType.ASSET_CHECK_EVALUATION}
log = logging.getLogger(__name__)


def _last_per_asset_and_type(stored: Sequence[tuple[EventLogEntry, int]]) -> list[tuple[EventLogEntry, int]]:
    """The events whose asset-key row update survives the batch: each update of an asset's row sets the
    same columns for events of one type, so only the last of each (asset, type) decides the row. One
    serialized row per asset and batch instead of one per event."""
    last: dict[tuple[Any, Any], int] = {}
    for position, (entry, _) in enumerate(stored):
        last[(entry.dagster_event.asset_key, entry.dagster_event_type)] = position
    return [stored[position] for position in sorted(last.values())]


class BatchedEventWrites:
    """What both photoset event logs add to Dagster's: a batch of asset events and check evaluations is
    written with its index work in one transaction on one connection, and the schema questions Dagster
    asks on every event are answered from memory once answered yes (tables and columns only ever
    appear, at a migration)."""

    batches_check_evaluations = True  # the recorder asks: Dagster's Postgres storage rejects them in a batch
    _asset_key_index_cols = False

    def has_table(self, table_name: str) -> bool:
        known = vars(self).setdefault("_known_tables", set())  # per instance; asked during __init__ too
        if table_name not in known and super().has_table(table_name):
            known.add(table_name)
        return table_name in known

    def _has_asset_key_index_cols_on_connection(self, conn: Connection) -> bool:
        if not self._asset_key_index_cols:
            self._asset_key_index_cols = super()._has_asset_key_index_cols_on_connection(conn)
        return self._asset_key_index_cols

    @property
    def _batch(self) -> threading.local:
        """The index connection of the batch this thread is storing (``connection``), if any: per thread,
        so a slot claim on another thread never runs inside (or commits) someone else's batch."""
        return vars(self).setdefault("_batch_state", threading.local())

    def index_connection(self) -> Any:
        batch_connection = getattr(self._batch, "connection", None)
        if batch_connection is not None:  # Dagster's check bookkeeping, inside this thread's batch
            return contextlib.nullcontext(batch_connection)
        return super().index_connection()

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """Runs of batchable events in one transaction each, everything else as Dagster stores it, in
        the order given. Never raises after writing part of ``events``: Dagster answers a raise by storing
        every event again, one by one, which would duplicate what was written."""
        for batchable, segment in itertools.groupby(events, key=_batchable):
            if not batchable:
                for entry in segment:
                    self.store_event(entry)
                continue
            for _run_id, group in itertools.groupby(segment, key=lambda entry: entry.run_id):
                entries = list(group)
                try:
                    self._store_batched(entries)
                except Exception as error:  # rolled back, nothing of it stored: Dagster's own way, one by one
                    log.warning("storing %d events in one batch failed (%s); storing them one by one",
                                len(entries), error)
                    for entry in entries:
                        self.store_event(entry)

    def _store_batched(self, entries: Sequence[EventLogEntry]) -> None:
        """Store one run's batchable events atomically, or raise having stored none of them."""
        raise NotImplementedError

    def _index_batch(self, conn: Connection, entries: Sequence[EventLogEntry], rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows`` (the serialized ``entries``) into the index's event table, then their index
        rows: asset tags and asset rows, check executions."""
        stored = list(zip(entries, _insert_returning_ids(conn, rows), (row["event"] for row in rows), strict=True))
        assets = [(entry, event_id) for entry, event_id, _ in stored if entry.dagster_event_type in ASSET_EVENTS]
        self._store_asset_event_tags(conn, [entry for entry, _ in assets], [event_id for _, event_id in assets])
        for entry, event_id in _last_per_asset_and_type(assets):
            self._store_asset_event(conn, entry, event_id)
        checks = [item for item in stored if item[0].dagster_event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
        if checks:
            self._batch.connection = conn
            try:
                self._store_check_evaluations(conn, checks)
            finally:
                self._batch.connection = None

    def _store_check_evaluations(self, conn: Connection, checks: Sequence[tuple[EventLogEntry, int, str]]) -> None:
        """Dagster's ``_update_asset_check_evaluation`` for a batch: one UPDATE of the rows the run's
        check-planned event created, executed for every evaluation. An evaluation with no planned row
        (Dagster then inserts one) sends the whole batch through Dagster's own path (idempotent)."""
        evaluations = [entry.dagster_event.event_specific_data for entry, _, _ in checks]
        if any(evaluation.partition is None for evaluation in evaluations):
            for entry, event_id, _ in checks:
                self.store_asset_check_event(entry, event_id)
            return
        table = AssetCheckExecutionsTable
        statement = table.update().where(
            table.c.asset_key == bindparam("b_asset_key"), table.c.check_name == bindparam("b_check_name"),
            table.c.run_id == bindparam("b_run_id"), table.c.partition == bindparam("b_partition"),
        ).values(
            execution_status=bindparam("b_status"), evaluation_event=bindparam("b_event"),
            evaluation_event_timestamp=bindparam("b_timestamp"), evaluation_event_storage_id=bindparam("b_event_id"),
            materialization_event_storage_id=bindparam("b_materialization_id"),
        )
        conn.execute(statement, [{
            "b_asset_key": evaluation.asset_key.to_string(), "b_check_name": evaluation.check_name,
            "b_run_id": entry.run_id, "b_partition": evaluation.partition,
            "b_status": (AssetCheckExecutionRecordStatus.SUCCEEDED if evaluation.passed
                         else AssetCheckExecutionRecordStatus.FAILED).value,
            "b_event": serialized, "b_timestamp": self._event_insert_timestamp(entry), "b_event_id": event_id,
            "b_materialization_id": (evaluation.target_materialization_data.storage_id
                                     if evaluation.target_materialization_data else None),
        } for (entry, event_id, serialized), evaluation in zip(checks, evaluations)])
        # rowcount of an executemany is not reliable on every driver: count what now points at the batch
        # (the key columns first, so the count is a lookup in the table's unique index, not a scan)
        updated = conn.execute(select(func.count()).select_from(table).where(
            table.c.asset_key.in_({evaluation.asset_key.to_string() for evaluation in evaluations}),
            table.c.check_name.in_({evaluation.check_name for evaluation in evaluations}),
            table.c.run_id.in_({entry.run_id for entry, _, _ in checks}),
            table.c.evaluation_event_storage_id.in_([event_id for _, event_id, _ in checks]))).scalar_one()
        if updated != len(checks):
            for entry, event_id, _ in checks:
                self.store_asset_check_event(entry, event_id)

    def _store_asset_check_evaluation_planned(self, event: EventLogEntry, event_id: int | None) -> None:
        """Dagster's, with the event serialized once rather than once per partition (quadratic in the
        size of a range run: 1,000 partitions cost a second, 60,000 would cost an hour)."""
        planned = event.dagster_event.event_specific_data
        partition_keys = planned.partitions_subset.get_partition_keys() if planned.partitions_subset else [None]
        shared = {
            "asset_key": planned.asset_key.to_string(), "check_name": planned.check_name, "run_id": event.run_id,
            "execution_status": AssetCheckExecutionRecordStatus.PLANNED.value,
            "evaluation_event": serialize_value(event), "evaluation_event_timestamp": self._event_insert_timestamp(event),
            "evaluation_event_storage_id": event_id,
        }
        with self.index_connection() as conn:
            conn.execute(AssetCheckExecutionsTable.insert(), [{**shared, "partition": key} for key in partition_keys])


def _batchable(entry: EventLogEntry) -> bool:
    return entry.is_dagster_event and entry.dagster_event_type in BATCHED_EVENTS


def _insert_returning_ids(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert event rows, returning their ids in row order: in one statement where the database can say
    which id went to which row, else row by row (SQLite before 3.35 has no RETURNING)."""
    if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        return list(conn.execute(SqlEventLogStorageTable.insert().returning(
            SqlEventLogStorageTable.c.id, sort_by_parameter_order=True), rows).scalars())
    return [conn.execute(SqlEventLogStorageTable.insert(), row).inserted_primary_key[0] for row in rows]


class PhotosetSqliteEventLogStorage(BatchedEventWrites, SqliteEventLogStorage):
    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
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

    def _store_batched(self, entries: Sequence[EventLogEntry]) -> None:
        """One transaction per database (Dagster's SQLite storage writes event by event, two or three
        commits each); the index and the run's shard get the same serialized rows. The index first: it
        is the database other processes write too, so the one a batch can fail on (locked); the run's
        shard takes one plain insert after it."""
        rows = [self._event_to_row(entry) for entry in entries]
        with self.index_transaction() as conn:
            self._index_batch(conn, entries, rows)
        try:
            with self.run_connection(entries[0].run_id) as conn:
                conn.execute(SqlEventLogStorageTable.insert(), rows)
        except Exception as error:  # the index, which every status question reads, has them: storing them
            # again would count each twice, so the run's own log goes without them and says so
            log.error("the run log of %s misses %d events: %s", entries[0].run_id, len(rows), error)

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


class PhotosetPostgresEventLogStorage(BatchedEventWrites, PostgresEventLogStorage):
    """Dagster's Postgres event log with photoset's batches: Dagster's own writes a batch of
    materializations in one insert but every check evaluation alone (a new connection, a table lookup
    and three statements each). Configured in deploy/postgres/dagster.yaml."""

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> PhotosetPostgresEventLogStorage:
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))

    def _store_batched(self, entries: Sequence[EventLogEntry]) -> None:
        with self.index_transaction() as conn:
            self._index_batch(conn, entries, [self._event_to_row(entry) for entry in entries])
