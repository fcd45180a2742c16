"""The downloader against a real loopback server: URL policy, atomicity, size caps, retries, concurrency."""

from __future__ import annotations

import os
import threading
import time

import pytest

from photoset_dagster.core.download import Downloader, DownloadJob
from photoset_dagster.core.http import RetryPolicy, UrlPolicyError, check_download_url, make_client
from photoset_dagster.demo.server import Fault, PhotoServer
from photoset_dagster_tests.fixtures_http import FAST_RETRY, image_bytes

PNG = image_bytes("PNG", size=(64, 48))


def entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def served(photo_server):
    photo_server.set_file("abc", PNG)
    return photo_server


def job_for(server: PhotoServer, tmp_path, name: str = "abc") -> DownloadJob:
    return DownloadJob(name, server.file_url(name), tmp_path / "raw" / name)


def test_download_writes_the_complete_file_under_its_final_name(served, downloader, tmp_path):
    job = job_for(served, tmp_path)

    result = downloader.download(job)

    assert (result.ok, result.nbytes, result.error, result.attempts) == (True, len(PNG), None, 1)
    assert job.dest.read_bytes() == PNG
    assert entries(job.dest.parent) == ["abc"]  # no temporary left beside it; the folder was created


def test_a_chunked_body_without_content_length_downloads(photo_server, downloader, tmp_path):
    photo_server.set_file("abc", PNG, chunked=True)

    result = downloader.download(job_for(photo_server, tmp_path))

    assert result.ok and (tmp_path / "raw" / "abc").read_bytes() == PNG


# --- URL policy -----------------------------------------------------------------------------


def test_http_is_refused_unless_allowed(served, http_client, tmp_path):
    strict = Downloader(http_client, FAST_RETRY, allow_http=False)

    result = strict.download(job_for(served, tmp_path))

    assert not result.ok and (result.attempts, result.kind, result.retries_exhausted) == (0, "url_refused", False)
    assert "scheme 'http'; only https allowed" in result.error
    assert served.requests == [] and entries(tmp_path / "raw") == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/x", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("https:///no-host", "no host"),
        ("", "scheme ''"),
        ("//127.0.0.1/x", "scheme ''"),
        ("http://[::1", "malformed"),
        (None, "not a string (NoneType)"),
        (42, "not a string (int)"),
    ],
)
def test_check_download_url_refuses_with_a_reason(url, reason):
    with pytest.raises(UrlPolicyError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_download_url(url, allow_http=True)


def test_check_download_url_accepts_https_always_and_http_on_request():
    assert check_download_url("https://cdn.example/abc", allow_http=False) == "https://cdn.example/abc"
    assert check_download_url("HTTP://cdn.example/abc", allow_http=True) == "HTTP://cdn.example/abc"
    with pytest.raises(UrlPolicyError):
        check_download_url("http://cdn.example/abc", allow_http=False)


# --- failures never leave a file ----------------------------------------------------------


def test_a_truncated_body_is_retried_and_never_leaves_a_raw_file(served, downloader, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("truncate", times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert not result.ok and result.attempts == FAST_RETRY.attempts
    assert (result.kind, result.retries_exhausted) == ("truncated", True)
    assert result.error.startswith("body cut short: RemoteProtocolError")
    assert len(sleeps.calls) == FAST_RETRY.retries
    assert entries(tmp_path / "raw") == []


def test_a_download_interrupted_mid_stream_completes_on_rerun(served, http_client, tmp_path):
    served.add_fault("/files/abc", Fault("truncate", times=1))
    no_retries = Downloader(http_client, RetryPolicy(retries=0), allow_http=True)
    job = job_for(served, tmp_path)

    first = no_retries.download(job)
    assert not first.ok and entries(job.dest.parent) == []

    second = no_retries.download(job)
    assert second.ok and job.dest.read_bytes() == PNG


def test_a_crash_while_writing_removes_the_temporary(served, downloader, tmp_path, monkeypatch):
    def crash(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        downloader.download(job_for(served, tmp_path))
    assert entries(tmp_path / "raw") == []


def test_oversize_by_content_length_is_refused_without_retry(served, http_client, sleeps, tmp_path):
    capped = Downloader(http_client, FAST_RETRY, allow_http=True, max_bytes=len(PNG) - 1, sleep=sleeps)

    result = capped.download(job_for(served, tmp_path))

    assert not result.ok and (result.attempts, result.kind) == (1, "too_large") and sleeps.calls == []
    assert f"Content-Length {len(PNG)} exceeds the {len(PNG) - 1}-byte limit" in result.error
    assert entries(tmp_path / "raw") == []


def test_oversize_while_streaming_is_refused_without_retry(photo_server, http_client, sleeps, tmp_path):
    big = PNG + bytes(300_000)  # several chunks; no Content-Length to refuse it up front
    photo_server.set_file("abc", big, chunked=True)
    capped = Downloader(http_client, FAST_RETRY, allow_http=True, max_bytes=200_000, sleep=sleeps)

    result = capped.download(job_for(photo_server, tmp_path))

    assert not result.ok and (result.attempts, result.kind) == (1, "too_large")
    assert result.error == "body exceeds the 200000-byte limit"
    assert entries(tmp_path / "raw") == []


def test_a_body_that_is_not_an_image_is_not_kept(served, downloader, tmp_path):
    served.add_fault("/files/abc", Fault("garbage", times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert not result.ok and (result.attempts, result.kind) == (1, "not_an_image")
    assert result.error == "not a supported image (starts with b'<!doctype html><')"
    assert entries(tmp_path / "raw") == []


def test_an_empty_body_is_not_an_image(photo_server, downloader, tmp_path):
    photo_server.set_file("abc", b"")

    result = downloader.download(job_for(photo_server, tmp_path))

    assert not result.ok and result.error == "not a supported image (starts with b'')"


def test_404_fails_at_once(photo_server, downloader, sleeps, tmp_path):
    result = downloader.download(job_for(photo_server, tmp_path, "never-served"))

    assert not result.ok and result.error == "HTTP 404" and result.attempts == 1 and sleeps.calls == []
    assert (result.kind, result.retries_exhausted) == ("http_status", False)
    assert photo_server.requests == ["/files/never-served"]


def test_a_transient_status_that_persists_exhausts_the_retries(served, downloader, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("status", status=503, times=-1))

    result = downloader.download(job_for(served, tmp_path))

    assert (result.ok, result.kind, result.retries_exhausted) == (False, "http_status", True)
    assert result.attempts == FAST_RETRY.attempts and len(served.requests) == FAST_RETRY.attempts
    assert result.error.startswith("HTTP 503 (gave up after 4 attempt(s)")


@pytest.mark.parametrize(
    ("fault", "expected_sleep"),
    [(Fault("status", status=503, retry_after="3"), 3.0), (Fault("status", status=429), FAST_RETRY.backoff_base_s)],
    ids=["503-retry-after", "429"],
)
def test_transient_statuses_are_retried(served, downloader, sleeps, tmp_path, fault, expected_sleep):
    served.add_fault("/files/abc", fault)

    result = downloader.download(job_for(served, tmp_path))

    assert result.ok and result.attempts == 2
    assert sleeps.calls == [expected_sleep]
    assert (tmp_path / "raw" / "abc").read_bytes() == PNG


def test_a_timeout_is_retried(served, impatient_client, sleeps, tmp_path):
    served.add_fault("/files/abc", Fault("timeout"))
    downloader = Downloader(impatient_client, FAST_RETRY, allow_http=True, sleep=sleeps)

    result = downloader.download(job_for(served, tmp_path))

    assert result.ok and result.attempts == 2 and len(sleeps.calls) == 1


def test_a_disk_failure_is_reported_as_such(served, downloader, tmp_path):
    (tmp_path / "raw").write_text("a file where the folder belongs")

    result = downloader.download(job_for(served, tmp_path))

    assert not result.ok and (result.kind, result.attempts) == ("disk", 1)
    assert result.error.startswith(f"cannot write {tmp_path / 'raw' / 'abc'}")


# --- many -----------------------------------------------------------------------------------


def test_download_many_overlaps_requests_and_keeps_job_order(tmp_path):
    latency_s, count = 0.25, 16
    with PhotoServer(latency_s=latency_s) as server, make_client(timeout_s=5.0) as client:
        for n in range(count):
            server.set_file(f"id{n}", image_bytes(seed=n))
        jobs = [DownloadJob(f"id{n}", server.file_url(f"id{n}"), tmp_path / f"id{n}") for n in range(count)]
        finished_on: list[threading.Thread] = []
        started = time.monotonic()

        results = Downloader(client, concurrency=count, allow_http=True).download_many(
            jobs, on_result=lambda result: finished_on.append(threading.current_thread())
        )
        elapsed = time.monotonic() - started

    assert [result.image_id for result in results] == [job.image_id for job in jobs]
    assert all(result.ok for result in results)
    assert elapsed < count * latency_s / 3, f"{elapsed:.2f}s: downloads did not overlap"
    assert finished_on == [threading.main_thread()] * count  # callbacks run on the caller's thread


def test_download_many_reports_each_failure_in_its_slot(served, downloader, tmp_path):
    jobs = [
        job_for(served, tmp_path),
        DownloadJob("gone", served.file_url("gone"), tmp_path / "raw" / "gone"),
        DownloadJob("ftp", "ftp://127.0.0.1/x", tmp_path / "raw" / "ftp"),
    ]

    results = downloader.download_many(jobs)

    assert [(result.image_id, result.ok) for result in results] == [("abc", True), ("gone", False), ("ftp", False)]
    assert entries(tmp_path / "raw") == ["abc"]
