"""The photo-list client against a misbehaving loopback list: https-only before any request and on
every redirect, bounded pages, and a log that says what was skipped and why."""

from __future__ import annotations

import time

import pytest

from photoset_dagster.core.http import PermanentError, RetryPolicy, open_response
from photoset_dagster.core.photolist import PhotoListClient, PhotoListError
from photoset_dagster.demo.server import Fault
from photoset_dagster_tests.fixtures_http import FAST_RETRY


def item(image_id: str) -> dict:
    return {"filename": image_id, "exportable_url": f"https://cdn.invalid/{image_id}"}


def list_client(server, client, sleeps, lines: list[str] | None = None, **options) -> PhotoListClient:
    log = lines.append if lines is not None else None
    return PhotoListClient(server.photos_url, client, FAST_RETRY, sleep=sleeps, log=log, allow_http=True, **options)


# --- https only -----------------------------------------------------------------------------


def test_an_http_list_url_is_refused_before_any_request(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1")]])
    strict = PhotoListClient(photo_server.photos_url, http_client, FAST_RETRY, sleep=sleeps)  # allow_http=False

    listing = strict.fetch_listing()

    assert photo_server.requests == []
    assert not listing.complete and listing.items == [] and listing.pages_fetched == 0
    assert "refusing to fetch the photo list" in listing.error and "only https allowed" in listing.error


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/photos.json"])
def test_a_page_redirected_to_another_scheme_is_refused_at_once(photo_server, http_client, sleeps, target):
    photo_server.add_fault("/photos.json?page=1", Fault("redirect", location=target, times=-1))

    with pytest.raises(PhotoListError, match="redirected to a refused url") as raised:
        list_client(photo_server, http_client, sleeps).fetch_page(1)

    assert repr(target) in str(raised.value)
    assert photo_server.requests == ["/photos.json?page=1"] and sleeps.calls == []


def test_a_redirect_to_plain_http_is_refused_before_it_is_requested(photo_server, http_client):
    # The hop check of every fetch: with https required, an http target is never contacted. (The
    # start URL's own check is the caller's; here it is plain http only because the server is.)
    photo_server.add_fault("/start", Fault("redirect", location=photo_server.photos_url + "?page=1"))

    with pytest.raises(PermanentError, match="scheme 'http'; only https allowed") as raised:
        with open_response(http_client, photo_server.base_url + "/start", allow_http=False):
            pass

    assert raised.value.kind == "redirect"
    assert photo_server.requests == ["/start"]


def test_a_page_redirect_within_policy_is_followed(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("redirect", status=307, location="/photos.json?page=1&v=2"))

    assert list_client(photo_server, http_client, sleeps).fetch_page(1) == [item("a1")]
    assert photo_server.requests == ["/photos.json?page=1", "/photos.json?page=1&v=2"]


def test_a_page_redirect_loop_is_refused_at_once(photo_server, http_client, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("redirect", location="/photos.json?page=1", times=-1))

    listing = list_client(photo_server, http_client, sleeps).fetch_listing()

    assert not listing.complete and "redirect loop" in listing.error
    assert photo_server.requests == ["/photos.json?page=1"] and sleeps.calls == []


# --- bounded pages --------------------------------------------------------------------------


def test_a_trickling_page_is_cut_at_its_deadline_and_retried(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("trickle", interval_s=0.02))
    lines: list[str] = []
    client = list_client(photo_server, http_client, sleeps, lines, page_timeout_s=0.3)

    started = time.monotonic()
    assert client.fetch_page(1) == [item("a1")]

    assert time.monotonic() - started < 1.0
    assert any("attempt 1 failed: too slow (" in line for line in lines), lines


def test_a_page_that_never_finishes_ends_the_listing_within_its_budget(photo_server, http_client, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("stall", times=-1))
    client = PhotoListClient(
        photo_server.photos_url, http_client, RetryPolicy(retries=1), sleep=sleeps, allow_http=True, page_timeout_s=0.3
    )

    started = time.monotonic()
    listing = client.fetch_listing()

    assert time.monotonic() - started < 2 * 0.3 + 0.5
    assert not listing.complete and "too slow (0 bytes in 0." in listing.error and "2 attempt(s)" in listing.error


def test_an_oversized_page_is_refused_without_retry(photo_server, http_client, sleeps):
    photo_server.set_pages([[item(f"id{n}") for n in range(20)]])

    with pytest.raises(PhotoListError, match="page exceeds the 100-byte limit"):
        list_client(photo_server, http_client, sleeps, max_page_bytes=100).fetch_page(1)
    assert sleeps.calls == [] and len(photo_server.requests) == 1


# --- saying what was skipped ----------------------------------------------------------------


def test_each_page_line_counts_what_was_kept_and_each_invalid_entry_says_why(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1"), {"filename": "../x"}, "junk", item("a1"), {"no": "name"}, item("b2")]])
    lines: list[str] = []

    listing = list_client(photo_server, http_client, sleeps, lines).fetch_listing()

    assert "page 1: 6 items (2 valid, 3 invalid, 1 duplicates)" in lines
    invalid_lines = [line for line in lines if "invalid entry" in line]
    assert invalid_lines == [
        f"warning: page 1: invalid entry {entry.index}: {entry.reason}" for entry in listing.invalid
    ]
    assert [entry.index for entry in listing.invalid] == [1, 2, 4]
    assert "'../x'" in invalid_lines[0] and "item is not an object: 'junk'" in invalid_lines[1]
    assert "item has no filename" in invalid_lines[2]
    assert not any(line.startswith("...") for line in lines)


def test_invalid_entries_past_the_log_limit_are_counted_in_one_line(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1"), *["junk"] * 3], ["junk"] * 4])
    lines: list[str] = []

    listing = list_client(photo_server, http_client, sleeps, lines, max_logged_invalid=5).fetch_listing()

    assert len(listing.invalid) == 7 and listing.complete  # every one kept for the run's report
    expected = [(1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert [(entry.page, entry.index) for entry in listing.invalid] == expected
    assert sum("invalid entry" in line for line in lines) == 5
    assert "page 2: 4 items (0 valid, 4 invalid, 0 duplicates)" in lines
    assert lines[-1] == "... and 2 more invalid entries"


def test_the_limit_cut_is_logged(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1"), item("b2"), item("c3")]])
    lines: list[str] = []

    list_client(photo_server, http_client, sleeps, lines).fetch_listing(limit=2)

    assert "page 1: 3 items (2 valid, 0 invalid, 0 duplicates)" in lines
    assert lines[-1] == "page 1: limit of 2 items reached; stopping"
