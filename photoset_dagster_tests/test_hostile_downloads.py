"""The downloader against a misbehaving loopback CDN: every download ends within its computable
deadline, whatever the server does, and says why it failed (kind, retry budget)."""

from __future__ import annotations

import collections
import os
import re
import threading
import time

import pytest

from photoset_dagster.core.download import DownloadCancelled, Downloader, DownloadJob
from photoset_dagster.core.http import RetryPolicy
from photoset_dagster.demo.server import Fault, PhotoServer
from photoset_dagster_tests.fixtures_http import image_bytes

PNG = image_bytes("PNG", size=(64, 48))
TINY_PNG = image_bytes("PNG", size=(1, 1))  # 69 bytes: trickles through in well under a second

# Small deadlines so each hostile case costs a fraction of a second.
GRACE_S = 0.3
HEADER_TIMEOUT_S = 0.5
ONE_RETRY = RetryPolicy(retries=1, backoff_base_s=0.01, max_total_wait_s=0.1, refused_delay_s=0.01)
SLACK_S = 0.5  # scheduling and connection set-up on a loaded machine


def hasty(client, sleeps, policy: RetryPolicy = ONE_RETRY, **options) -> Downloader:
    settings = {"header_timeout_s": HEADER_TIMEOUT_S, "min_rate_bps": 16 * 1024, "rate_grace_s": GRACE_S}
    return Downloader(client, policy, allow_http=True, sleep=sleeps, **{**settings, **options})


def job_for(server: PhotoServer, tmp_path, name: str = "abc") -> DownloadJob:
    return DownloadJob(name, server.file_url(name), tmp_path / "raw" / name)


def entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def timed(download, job):
    started = time.monotonic()
    result = download(job)
    return result, time.monotonic() - started


@pytest.fixture
def served(photo_server):
    photo_server.set_file("abc", PNG)
    return photo_server


# --- slow bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("content_length", [None, 1_000_000], ids=["chunked", "content-length"])
def test_an_endless_trickle_is_cut_after_the_grace_period(served, http_client, sleeps, tmp_path, content_length):
    served.add_fault("/files/abc", Fault("trickle", times=-1, interval_s=0.02, content_length=content_length))

    result, elapsed = timed(hasty(http_client, sleeps).download, job_for(served, tmp_path))

    assert not result.ok and (result.kind, result.retries_exhausted, result.attempts) == ("too_slow", True, 2)
    got = re.match(r"too slow \((\d+) bytes in (\d+\.\d) s\)", result.error)
    assert got, result.error
    assert int(got.group(1)) > 0 and float(got.group(2)) >= GRACE_S - 0.05
    assert elapsed < 2 * (GRACE_S + SLACK_S)  # both attempts were cut near the grace period
    assert entries(tmp_path / "raw") == []  # no temporary left
    assert len(served.requests) == 2


def test_a_slow_body_that_keeps_the_minimum_rate_completes(photo_server, http_client, sleeps, tmp_path):
    # ~100 B/s for 0.7 s: longer than the grace period, but above the 20 B/s floor throughout.
    photo_server.set_file("abc", TINY_PNG)
    photo_server.add_fault("/files/abc", Fault("trickle", interval_s=0.01, content_length=len(TINY_PNG)))

    result = hasty(http_client, sleeps, min_rate_bps=20, rate_grace_s=0.2).download(job_for(photo_server, tmp_path))

    assert result.ok and result.attempts == 1, result.error
    assert (tmp_path / "raw" / "abc").read_bytes() == TINY_PNG


def test_a_body_stalling_after_its_headers_is_cut(served, http_client, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("stall", times=-1))

    result, elapsed = timed(hasty(http_client, sleeps).download, job_for(served, tmp_path))

    assert (result.kind, result.attempts, result.retries_exhausted) == ("too_slow", 2, True)
    assert result.error.startswith("too slow (0 bytes in 0.")
    assert elapsed < 2 * (GRACE_S + SLACK_S)  # far below the client's 10 s read timeout
    assert entries(tmp_path / "raw") == []


def test_a_server_stalling_before_its_headers_is_cut_at_the_header_timeout(served, http_client, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("timeout", times=-1, delay_s=30.0))

    result, elapsed = timed(hasty(http_client, sleeps).download, job_for(served, tmp_path))

    assert (result.kind, result.attempts, result.retries_exhausted) == ("timeout", 2, True)
    assert "deadline passed after 0.5 s" in result.error
    assert elapsed < 2 * (HEADER_TIMEOUT_S + SLACK_S)


def test_endlessly_trickling_headers_are_cut_at_the_header_timeout(served, http_client, sleeps, tmp_path):
    # Each byte arrives long before the client's 10 s read timeout: only the deadline can end this.
    served.add_fault("/files/abc", Fault("trickle_headers", times=-1, interval_s=0.02))

    result, elapsed = timed(hasty(http_client, sleeps).download, job_for(served, tmp_path))

    assert (result.kind, result.attempts) == ("timeout", 2) and "deadline passed" in result.error
    assert elapsed < 2 * (HEADER_TIMEOUT_S + SLACK_S)


def test_a_slow_attempt_is_retried_and_the_next_one_succeeds(served, http_client, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("stall", times=1))

    result = hasty(http_client, sleeps).download(job_for(served, tmp_path))

    assert result.ok and result.attempts == 2 and len(sleeps.calls) == 1
    assert (tmp_path / "raw" / "abc").read_bytes() == PNG


# --- redirects ------------------------------------------------------------------------------


def test_a_redirect_within_policy_is_followed(served, downloader, tmp_path):
    served.add_fault("/files/old", Fault("redirect", status=301, location=served.file_url("abc")))

    result = downloader.download(DownloadJob("abc", served.file_url("old"), tmp_path / "abc"))

    assert result.ok and result.attempts == 1
    assert served.requests == ["/files/old", "/files/abc"]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x"])
def test_a_redirect_to_another_scheme_fails_at_once(served, downloader, sleeps, tmp_path, target):
    served.add_fault("/files/abc", Fault("redirect", location=target, times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert (result.ok, result.kind, result.attempts, result.retries_exhausted) == (False, "redirect", 1, False)
    assert result.error.startswith(f"redirected to a refused url (Location: {target!r}): ")
    assert served.requests == ["/files/abc"] and sleeps.calls == []
    assert entries(tmp_path / "raw") == []


def test_a_redirect_to_itself_is_a_loop(served, downloader, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("redirect", location="/files/abc", times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert (result.kind, result.attempts) == ("redirect", 1) and sleeps.calls == []
    assert result.error.startswith("redirect loop:")
    assert served.requests == ["/files/abc"]


def test_a_longer_redirect_loop_is_caught_when_it_closes(served, downloader, tmp_path):
    served.add_fault("/files/abc", Fault("redirect", location="/files/other", times=-1))
    served.add_fault("/files/other", Fault("redirect", location="/files/abc", times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert result.kind == "redirect" and "redirect loop" in result.error
    assert served.requests == ["/files/abc", "/files/other"]


# --- refused connections --------------------------------------------------------------------


def test_a_refused_connection_fails_within_its_short_budget(http_client, tmp_path):
    with PhotoServer() as gone:
        job = job_for(gone, tmp_path)  # nobody listens on its port once it stops
    downloader = Downloader(http_client, RetryPolicy(), allow_http=True)  # the defaults, real sleeps

    result, elapsed = timed(downloader.download, job)

    policy = RetryPolicy()
    assert (result.kind, result.retries_exhausted) == ("connection_refused", True)
    assert result.attempts == policy.refused_retries + 1 == 3
    assert "ConnectError" in result.error and "refused 3 time(s)" in result.error
    expected_wait = policy.refused_retries * policy.refused_delay_s  # 1 s, not the 31 s of full backoff
    assert expected_wait <= elapsed < expected_wait + 1.0


# --- the bound ------------------------------------------------------------------------------


def test_the_worst_case_follows_from_the_deadlines_and_the_retry_policy(http_client):
    downloader = Downloader(http_client, RetryPolicy(), concurrency=16)  # every default

    assert downloader.attempt_deadline_s() == 30 + 200 * 1024 * 1024 / (16 * 1024)  # 12830 s for 200 MiB
    assert downloader.attempt_deadline_s(1024 * 1024) == 30 + 64  # a declared 1 MiB body
    assert downloader.attempt_deadline_s(1000) == 30 + 10  # small bodies get the grace period
    per_download = 6 * 12830 + 300
    assert downloader.worst_case_seconds() == per_download
    assert downloader.worst_case_seconds(33) == 3 * per_download  # 16 at a time


def test_a_hostile_batch_ends_within_its_worst_case_and_counts_its_reasons(photo_server, http_client, tmp_path):
    kinds = {
        "trickle": Fault("trickle", times=-1, interval_s=0.02),
        "stall": Fault("stall", times=-1),
        "silent": Fault("timeout", times=-1, delay_s=30.0),
        "busy": Fault("status", status=503, times=-1),
        "loop": Fault("redirect", location="/files/loop", times=-1),
    }
    for name, fault in kinds.items():
        photo_server.set_file(name, TINY_PNG)  # under the cap below: only slowness can fail it
        photo_server.add_fault(f"/files/{name}", fault)
    # A small size cap makes the bound tight enough to mean something: 0.5 + max(0.3, 4096 / 16 KiB).
    downloader = hasty(http_client, time.sleep, concurrency=2, max_bytes=4096)
    jobs = [job_for(photo_server, tmp_path, name) for name in kinds]

    started = time.monotonic()
    results = downloader.download_many(jobs)
    elapsed = time.monotonic() - started

    assert elapsed < downloader.worst_case_seconds(len(jobs)), (elapsed, downloader.worst_case_seconds(len(jobs)))
    by_kind = collections.Counter(result.kind for result in results)
    assert by_kind == {"too_slow": 2, "timeout": 1, "http_status": 1, "redirect": 1}
    assert sum(result.retries_exhausted for result in results) == 4  # all but the (permanent) loop
    assert entries(tmp_path / "raw") == []


def test_a_retry_policy_without_retries_makes_one_attempt(served, http_client, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("stall", times=-1))

    result = hasty(http_client, sleeps, RetryPolicy(retries=0)).download(job_for(served, tmp_path))

    assert (result.kind, result.attempts, result.retries_exhausted) == ("too_slow", 1, True)
    assert sleeps.calls == []


# --- interrupts -------------------------------------------------------------------------------


def test_an_interrupt_stops_a_trickling_download_at_once(served, http_client, tmp_path):
    served.add_fault("/files/abc", Fault("trickle", times=-1, interval_s=0.02))
    patient = hasty(http_client, None, RetryPolicy(retries=5, backoff_base_s=30.0, max_total_wait_s=300.0),
                    rate_grace_s=30.0)  # left alone: minutes of trickles and backoff
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()

    started = time.monotonic()
    with pytest.raises(DownloadCancelled):
        patient.download(job_for(served, tmp_path), cancel)

    assert time.monotonic() - started < 0.5 + SLACK_S + 1.0
    assert entries(tmp_path / "raw") == []  # no temporary left behind


def test_an_interrupt_cuts_a_backoff_wait_short(served, http_client, tmp_path):
    served.add_fault("/files/abc", Fault("status", status=503, times=-1))
    patient = hasty(http_client, None, RetryPolicy(retries=5, backoff_base_s=30.0, max_total_wait_s=300.0))
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()

    started = time.monotonic()
    with pytest.raises(DownloadCancelled):
        patient.download(job_for(served, tmp_path), cancel)

    assert time.monotonic() - started < 0.5 + SLACK_S + 1.0  # not the 30 s backoff
