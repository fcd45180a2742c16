"""A crash never wedges anything: real `photoset` processes, killed with SIGKILL mid-pass or stopped with
SIGTERM while they wait, against a real instance home. Nothing is cleaned up by hand in between."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from photoset_dagster.core.leases import FileLease
from photoset_dagster.core.layout import DataLayout
from photoset_dagster.defs.concurrency import GPU_POOL, LEASE_HOST_TAG, LEASE_PID_TAG, lease_dir, reap_dead_runs
from photoset_dagster.demo.server import Fault

PHOTOSET = [sys.executable, "-m", "photoset_dagster.cli"]
IMAGES = 24  # captions at ~3/s on the tiny Gemma: a pass of several seconds to kill in the middle


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "dagster_home"


@pytest.fixture
def env(photoset_env: dict[str, str], home: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PHOTOSET_", "DAGSTER_"))}
    return {**clean, **photoset_env, "DAGSTER_HOME": str(home), "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "16"}


@pytest.fixture
def synced(photo_site, env, tmp_path) -> DataLayout:
    ids = photo_site.add_images(IMAGES)
    photo_site.publish(ids)
    done = subprocess.run([*PHOTOSET, "sync"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return DataLayout(env["PHOTOSET_DATA_ROOT"])


def captions_done(layout: DataLayout) -> int:
    return len(list(layout.kind_dir("captions").glob("*.json")))


def open_instance(home: Path) -> dg.DagsterInstance:
    os.environ["DAGSTER_HOME"] = str(home)  # the instance's storage config reads it
    return dg.DagsterInstance.from_config(str(home))


def test_a_generate_killed_mid_pass_does_not_block_the_next_one(env, synced, home, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    first = subprocess.Popen([*PHOTOSET, "generate", "--pass", "captions"], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while captions_done(synced) < 2:  # mid-pass: the slot is held, the model is working
        assert first.poll() is None, "the first generate ended before it could be killed"
        assert time.monotonic() < deadline, "no caption appeared in time"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # an OOM kill, a lost SSH session
    first.wait(timeout=30)
    assert captions_done(synced) < IMAGES

    started = time.monotonic()
    second = subprocess.run([*PHOTOSET, "generate", "--pass", "captions"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)

    assert second.returncode == 0, second.stderr[-3000:]
    assert captions_done(synced) == IMAGES
    with open_instance(home) as instance:
        runs = instance.get_runs()
        assert not [run for run in runs if run.status == DagsterRunStatus.STARTED]  # the UI tells the truth
        [killed] = [run for run in runs if run.status == DagsterRunStatus.FAILURE]
        failure = instance.all_logs(killed.run_id, of_type=DagsterEventType.RUN_FAILURE)
        assert "died (its process (pid" in failure[-1].dagster_event.message
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots == []
    print(f"second generate: {time.monotonic() - started:.1f}s")


def test_a_sync_killed_while_it_lists_is_found_dead(env, photo_site, home, tmp_path, monkeypatch):
    """Before any model stage or slot: a run holds its lease from its first moment, so a kill during
    a long listing leaves no run STARTED forever (the sensor would wait on it for good)."""
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    photo_site.publish(photo_site.add_images(2))
    photo_site.server.add_fault("/photos.json?page=1", Fault("timeout", delay_s=60, times=-1))
    syncing = subprocess.Popen([*PHOTOSET, "sync"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    leases = home / "photoset" / "run-leases"
    while not list(leases.glob("*.lock")):  # until its run holds the lease (then it waits on the stalled page)
        assert syncing.poll() is None and time.monotonic() < deadline, "the sync did not start its run in time"
        time.sleep(0.2)
    time.sleep(1.0)  # the lease's tags are written just after the lock is taken
    os.killpg(syncing.pid, signal.SIGKILL)
    syncing.wait(timeout=30)

    with open_instance(home) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.STARTED  # what the UI would show forever, without a lease
        assert reap_dead_runs(instance) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE


def test_a_waiting_generate_says_who_holds_the_slot_uses_no_cpu_and_stops_on_sigterm(env, synced, home, tmp_path):
    with open_instance(home) as instance:
        # A live run on this machine holds the one gpu slot: its lease is held by this test process.
        holder = create_run_for_test(instance, job_name="catch_up_job", status=DagsterRunStatus.STARTED,
                                     tags={LEASE_HOST_TAG: socket.gethostname(), LEASE_PID_TAG: str(os.getpid())})
        lease = FileLease.try_take(lease_dir(instance) / f"{holder.run_id}.lock", {"run_id": holder.run_id})
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
        assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, holder.run_id, "catch_up").is_claimed
        try:
            waiter = subprocess.Popen([*PHOTOSET, "generate", "--pass", "captions"], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 240
            while not waiting_runs(instance, holder.run_id):
                assert waiter.poll() is None, waiter.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the second generate never asked for the slot"
                time.sleep(0.2)
            time.sleep(3)  # the events of the stages before (facts) are still being written
            before = _cpu_seconds(waiter.pid)
            time.sleep(8)
            used = _cpu_seconds(waiter.pid) - before
            assert waiter.poll() is None and used < 0.8, f"the waiter used {used:.2f}s of CPU in 8s"

            stopped_at = time.monotonic()
            waiter.send_signal(signal.SIGTERM)
            _, err = waiter.communicate(timeout=30)
            assert time.monotonic() - stopped_at < 20
            assert waiter.returncode == 130 and "photoset: interrupted" in err, err[-2000:]
            assert f"waiting for a gpu slot: 1 of 1 held by run {holder.run_id[:8]} (catch_up_job, since 20" in err, err
            assert "Traceback" not in err and "DagsterExecutionInterruptedError" not in err
            info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
            assert [slot.run_id for slot in info.claimed_slots] == [holder.run_id]
            assert waiting_runs(instance, holder.run_id) == []  # its claim was withdrawn on the way out
            assert captions_done(synced) == 0
        finally:
            lease.release()
            instance.event_log_storage.free_concurrency_slots_for_run(holder.run_id)


def waiting_runs(instance: dg.DagsterInstance, holder: str) -> list[str]:
    return [step.run_id for step in instance.event_log_storage.get_concurrency_info(GPU_POOL).pending_steps
            if step.run_id != holder]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
