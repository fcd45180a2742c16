"""Crash safety for Dagster runs: a run lease, a reaper of dead runs, and the ``gpu`` pool slot.

Dagster frees a run's pool slots only once the run *finishes*; a run whose process was killed
(``kill -9``, an OOM kill, a lost SSH session) stays STARTED and keeps its slot forever, and the CLI
has no daemon to notice. So every photoset step takes a **run lease** — an flock'd file under the
instance home, which the kernel releases when the process dies, plus a heartbeat in the run's tags
for runs on other machines — and every photoset process that waits for anything first **reaps**
runs whose lease is provably dead: their slots are freed and they are marked failed, so the UI shows
the truth and the next command goes on without a manual step.

The ``gpu`` pool slot is claimed here, by the step, only for the stages that run a model on this
machine (sync, facts, the dataset, shards, verify and prune never take it; neither does a captioner
talking to a server). While it waits, it says which run holds the slot and since when, sleeps, and
stops at once on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter

from ..core.leases import FileLease, is_abandoned

log = logging.getLogger(__name__)

GPU_POOL = "gpu"
LEASE_HOST_TAG = "photoset/lease_host"
LEASE_PID_TAG = "photoset/lease_pid"
HEARTBEAT_TAG = "photoset/heartbeat"
HEARTBEAT_EVERY_S = 15.0
# A run on another machine whose heartbeat is older than this is taken for dead.
HEARTBEAT_TIMEOUT_S = 120.0
WAIT_REPORT_EVERY_S = 5.0

_leases: dict[str, FileLease] = {}
_leases_lock = threading.Lock()
_heartbeat: threading.Thread | None = None


def lease_dir(instance: dg.DagsterInstance) -> Path:
    return Path(instance.root_directory) / "photoset" / "run-leases"


def hold_run_lease(instance: dg.DagsterInstance, run_id: str) -> None:
    """Mark this process as the live owner of ``run_id`` until it ends (idempotent). The lease is
    never released early on purpose: between two steps of one run it must still hold."""
    with _leases_lock:
        if run_id in _leases:
            return
        _release_leases_of_finished_runs(instance)
        lease = FileLease.try_take(lease_dir(instance) / f"{run_id}.lock", {"run_id": run_id})
        if lease is None:  # another live process owns this run (a retry of the same run id): leave it be
            return
        _leases[run_id] = lease
    instance.add_run_tags(run_id, {LEASE_HOST_TAG: socket.gethostname(), LEASE_PID_TAG: str(os.getpid()),
                                   HEARTBEAT_TAG: _now()})
    _start_heartbeat(instance)


def _release_leases_of_finished_runs(instance: dg.DagsterInstance) -> None:
    """A long-lived process (tests, a notebook) runs many runs: drop the leases of finished ones."""
    if not _leases:
        return
    finished = {record.dagster_run.run_id for record in instance.get_run_records(
        RunsFilter(run_ids=list(_leases), statuses=list(FINISHED_STATUSES)))}
    for run_id in finished:
        _leases.pop(run_id).release()


def _start_heartbeat(instance: dg.DagsterInstance) -> None:
    global _heartbeat
    if _heartbeat is not None and _heartbeat.is_alive():
        return

    def beat() -> None:
        failing = False
        while True:
            time.sleep(HEARTBEAT_EVERY_S)
            with _leases_lock:
                run_ids = list(_leases)
            for run_id in run_ids:
                try:
                    instance.add_run_tags(run_id, {HEARTBEAT_TAG: _now()})
                except Exception as error:
                    # Never take a run down for it, but say so once per streak: another host calls a run
                    # without a beat for HEARTBEAT_TIMEOUT_S dead.
                    if not failing:
                        log.warning("photoset: the heartbeat of run %s failed (%s); retrying", run_id, error)
                    failing = True
                else:
                    if failing:
                        log.warning("photoset: the heartbeat of run %s is back", run_id)
                    failing = False

    _heartbeat = threading.Thread(target=beat, name="photoset-heartbeat", daemon=True)
    _heartbeat.start()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def dead_reason(instance: dg.DagsterInstance, run: dg.DagsterRun, holds_slots: bool) -> str | None:
    """Why ``run`` (not finished) can no longer be alive, or None when it may be."""
    host = run.tags.get(LEASE_HOST_TAG)
    if host == socket.gethostname():
        lease = lease_dir(instance) / f"{run.run_id}.lock"
        if is_abandoned(lease):
            return f"its process (pid {run.tags.get(LEASE_PID_TAG)}) is gone"
        return None
    beat = run.tags.get(HEARTBEAT_TAG)
    if host is not None and beat is not None and holds_slots:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(beat)).total_seconds()
        if age > HEARTBEAT_TIMEOUT_S:
            return f"no heartbeat from {host} for {age:.0f}s"
    return None


def reap_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] | None = None) -> list[str]:
    """Free the slots of finished or dead runs and mark dead runs failed; returns the ids reaped."""
    storage = instance.event_log_storage
    slot_holders = storage.get_concurrency_run_ids() if storage.supports_global_concurrency_limits else set()
    leased = {record.dagster_run.run_id for record in instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.STARTED], tags={LEASE_HOST_TAG: socket.gethostname()}))}
    reaped = []
    for run_id in sorted(slot_holders | leased):
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            # Dagster's daemon frees these a minute after the run ends; a CLI has no daemon.
            if run_id in slot_holders:
                storage.free_concurrency_slots_for_run(run_id)
            continue
        reason = dead_reason(instance, run, run_id in slot_holders)
        if reason is None:
            continue
        message = f"photoset: run {run_id} died ({reason}); its slots are freed and it is marked failed"
        instance.report_run_failed(run, message=message)
        storage.free_concurrency_slots_for_run(run_id)
        (lease_dir(instance) / f"{run_id}.lock").unlink(missing_ok=True)
        reaped.append(run_id)
        if log is not None:
            log(message)
    _remove_leases_of_ended_runs(instance, leased)
    return reaped


def _remove_leases_of_ended_runs(instance: dg.DagsterInstance, started: set[str]) -> None:
    """The lease files of runs whose process has ended since (every run that ran here leaves one: a
    lease is never given back early). A started run's file stays: it is how a dead run is told apart."""
    try:
        paths = list(lease_dir(instance).glob("*.lock"))
    except FileNotFoundError:
        return
    for path in paths:
        if path.stem not in started and is_abandoned(path):
            path.unlink(missing_ok=True)


class GpuSlot:
    """This step's claim on one slot of the ``gpu`` pool, taken on first need, freed on release."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, step_key: str) -> None:
        self.instance = instance
        self.run_id = run_id
        self.step_key = step_key
        self.log: Callable[[str], None] = lambda message: None
        self.claimed = False

    def acquire(self, cancel: threading.Event | None = None) -> None:
        storage = self.instance.event_log_storage
        if self.claimed or not storage.supports_global_concurrency_limits:
            return
        hold_run_lease(self.instance, self.run_id)
        storage.initialize_concurrency_limit_to_default(GPU_POOL)
        if storage.get_concurrency_info(GPU_POOL).limit is None:
            return  # an instance without a limit for the pool (or a default): nothing to wait for
        next_report = time.monotonic() + 1.0  # a slot freed within a second needs no message
        try:
            while not storage.claim_concurrency_slot(GPU_POOL, self.run_id, self.step_key).is_claimed:
                if reap_dead_runs(self.instance, self.log):
                    continue
                if time.monotonic() >= next_report:
                    self.log(f"waiting for a {GPU_POOL} slot: {self._holders()}")
                    next_report = time.monotonic() + WAIT_REPORT_EVERY_S
                if cancel is not None:
                    if cancel.wait(1.0):
                        raise InterruptedError(f"interrupted while waiting for a {GPU_POOL} slot")
                else:
                    time.sleep(1.0)
        except BaseException:
            storage.free_concurrency_slot_for_step(self.run_id, self.step_key)  # drop the pending claim
            raise
        self.claimed = True

    def release(self) -> None:
        if self.claimed:
            self.instance.event_log_storage.free_concurrency_slot_for_step(self.run_id, self.step_key)
            self.claimed = False

    def _holders(self) -> str:
        info = self.instance.event_log_storage.get_concurrency_info(GPU_POOL)
        described = []
        for slot in info.claimed_slots:
            run = self.instance.get_run_by_id(slot.run_id)
            started = run_started_at(self.instance, slot.run_id)
            name = run.job_name if run is not None else "?"
            described.append(f"run {slot.run_id[:8]} ({name}, since {started})")
        held = ", ".join(described) or "nobody (freeing)"
        return f"{len(info.claimed_slots)} of {info.slot_count} held by {held}"


def run_started_at(instance: dg.DagsterInstance, run_id: str) -> str:
    records = instance.get_run_records(RunsFilter(run_ids=[run_id]), limit=1)
    if not records:
        return "?"
    started = records[0].start_time or records[0].create_timestamp.timestamp()
    return dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def device_candidates(device: str, devices: list[str]) -> list[str]:
    """The devices a run may lease for a model set to ``device``: exactly that one when it names an
    index ("cuda:1", "cpu:0"), else ``devices``, else every visible GPU; empty for the plain CPU (no lease)."""
    if device == "cpu":
        return []
    if ":" in device:
        return [device]
    if devices:
        return list(devices)
    import torch

    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def visible_gpu_count() -> int:
    """GPUs this machine shows, without importing torch (used for the pool's default size)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([name for name in visible.split(",") if name.strip() and name.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


class ModelSlot:
    """What a run's model stages hold while a model computes here: one ``gpu`` pool slot and one
    device (a flock'd lease, so N runs on an N-GPU box each get their own GPU). Taken on the first
    model load, released when the step ends, or by the kernel when the process dies."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, step_key: str) -> None:
        self.pool = GpuSlot(instance, run_id, step_key)
        self.instance = instance
        self.run_id = run_id
        self.log: Callable[[str], None] = lambda message: None
        self.cancel: threading.Event | None = None
        self._device: str | None = None
        self._lease: FileLease | None = None

    def acquire(self, device: str, devices: list[str]) -> str:
        """The device this run's models use (leased on first call; the same one after)."""
        if self._device is not None:
            return self._device
        self.pool.log = self.log
        self.pool.acquire(self.cancel)
        candidates = device_candidates(device, devices)
        if not candidates:
            self._device = "cpu" if device in ("auto", "cuda") else device
            return self._device
        from ..core.leases import lease_device

        self._device, self._lease = lease_device(
            Path(self.instance.root_directory) / "photoset" / "device-leases", candidates,
            what=f"run {self.run_id}", on_wait=self.log, cancel=self.cancel,
        )
        self.log(f"models of this run use {self._device}")
        return self._device

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self._device = None
        self.pool.release()
