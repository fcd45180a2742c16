"""Every device busy, each owned by one run: device leases between real processes (the CPU's devices
named in settings stand in for GPUs), a crashed owner's device going to the next run, and
`photoset generate` on ``device = "auto"`` taking a device no other run holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from photoset_dagster.core import leases
from photoset_dagster.core.leases import FileLease, lease_device

DEVICES = ["cpu:0", "cpu:1"]
TAKE_AND_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from photoset_dagster.core.leases import lease_device
    device, lease = lease_device(Path(sys.argv[1]), sys.argv[2].split(","), what="probe", timeout_s=60)
    print(device, flush=True)
    time.sleep(600)
""")


def holder(lease_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TAKE_AND_HOLD, str(lease_dir), ",".join(DEVICES)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])


def test_each_process_owns_one_device_and_a_killed_owner_gives_it_back(tmp_path):
    first, second = holder(tmp_path), holder(tmp_path)
    third = None
    try:
        owned = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert owned == set(DEVICES)
        third = holder(tmp_path)  # both devices taken: it waits
        time.sleep(1.5)
        assert third.poll() is None

        first.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        first.wait(timeout=10)

        assert third.stdout.readline().strip() in DEVICES
    finally:
        for process in (first, second, third):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def test_a_lease_taken_on_a_file_its_holder_just_removed_is_taken_again_on_the_path(tmp_path, monkeypatch):
    path = tmp_path / "cuda_0.lock"
    real_open = os.open
    opened = []

    def open_then_lose_the_race(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if not opened:  # the holder releases (removes the file) between this open and the lock
            os.unlink(path)
        opened.append(fd)
        return fd

    monkeypatch.setattr(leases.os, "open", open_then_lose_the_race)
    lease = FileLease.try_take(path, {"device": "cuda:0"})

    assert lease is not None and len(opened) == 2  # the orphaned file's lock was not trusted
    assert os.fstat(opened[1]).st_ino == path.stat().st_ino  # the lock is on the file others open
    lease.release()


def test_a_wait_for_a_device_names_the_holders_and_can_be_cancelled(tmp_path):
    import threading

    device, lease = lease_device(tmp_path, ["cpu:0"], what="run A")
    heard: list[str] = []
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    try:
        with pytest.raises(InterruptedError):
            lease_device(tmp_path, ["cpu:0"], what="run B", on_wait=heard.append, cancel=cancel)
    finally:
        lease.release()
    assert device == "cpu:0" and heard and "cpu:0 by run A (pid" in heard[0]


def test_generate_on_auto_takes_the_device_no_other_run_holds(photo_site, photoset_env, tmp_path):
    ids = photo_site.add_images(4)
    photo_site.publish(ids)
    home = tmp_path / "dagster_home"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PHOTOSET_", "DAGSTER_"))}
    env = {**clean, **photoset_env, "DAGSTER_HOME": str(home), "PHOTOSET_DEVICE": "auto",
           "PHOTOSET_DEVICES": ",".join(DEVICES), "PHOTOSET_CAPTION_MAX_NEW_TOKENS": "8"}
    photoset = [sys.executable, "-m", "photoset_dagster.cli"]
    assert subprocess.run([*photoset, "sync"], env=env, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:  # a box with two GPUs: two slots
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        leases = Path(instance.root_directory) / "photoset" / "device-leases"
    other_run_device, lease = lease_device(leases, ["cpu:0"], what="another run")  # cpu:0 is busy
    try:
        busy = subprocess.run([*photoset, "generate", "--pass", "captions", f"--image-id={ids[0]}"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        lease.release()
    free = subprocess.run([*photoset, "generate", "--pass", "captions", f"--image-id={ids[1]}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)

    assert busy.returncode == free.returncode == 0, (busy.stderr[-2000:], free.stderr[-2000:])
    assert "models of this run use cpu:1" in busy.stderr  # the free one, not the busy cpu:0
    assert "models of this run use cpu:0" in free.stderr  # released, so the first again
