"""The photo-list client against a real loopback server: paging, retries, validation, snapshots."""

from __future__ import annotations

import datetime as dt
import email.utils
import json

import pytest

from photoset_dagster.core.http import RetryPolicy, parse_retry_after, retry_delay
from photoset_dagster.core.photolist import (
    PhotoItem,
    PhotoListClient,
    PhotoListError,
    PhotoListing,
    load_listing,
    save_listing,
)
from photoset_dagster.demo.catalog import LOOKALIKE_ID, demo_bad_items, demo_id
from photoset_dagster.demo.server import Fault, PhotoServer
from photoset_dagster_tests.fixtures_http import FAST_RETRY


def item(image_id: str, url: str | None = None) -> dict:
    return {"id": 1, "filename": image_id, "exportable_url": url or f"https://cdn.invalid/{image_id}"}


@pytest.fixture
def lines() -> list[str]:
    return []


def list_client(url: str, client, sleeps, policy: RetryPolicy = FAST_RETRY, **options) -> PhotoListClient:
    """A client for the loopback server: plain http allowed, sleeps recorded."""
    return PhotoListClient(url, client, policy, sleep=sleeps, allow_http=True, **options)


@pytest.fixture
def photo_list(photo_server, http_client, sleeps, lines) -> PhotoListClient:
    return list_client(photo_server.photos_url, http_client, sleeps, log=lines.append)


def page_requests(server: PhotoServer) -> list[str]:
    return [path for path in server.requests if path.startswith("/photos.json")]


# --- paging ---------------------------------------------------------------------------------


def test_pages_until_the_empty_page(photo_server, photo_list, lines):
    photo_server.set_pages([[item("a1"), item("b2")], [item("c3")]])

    listing = photo_list.fetch_listing()

    assert listing.ids == ["a1", "b2", "c3"]
    assert listing.items[0] == PhotoItem("a1", "https://cdn.invalid/a1")
    assert listing.complete and listing.error is None
    assert listing.pages_fetched == 3
    assert page_requests(photo_server) == [f"/photos.json?page={n}" for n in (1, 2, 3)]
    assert lines == [
        f"page 1: fetching {photo_server.photos_url}?page=1",
        "page 1: 2 items (2 valid, 0 invalid, 0 duplicates)",
        f"page 2: fetching {photo_server.photos_url}?page=2",
        "page 2: 1 items (1 valid, 0 invalid, 0 duplicates)",
        f"page 3: fetching {photo_server.photos_url}?page=3",
        "page 3: empty; stopping",
    ]


def test_base_url_with_a_query_appends_page_with_ampersand(photo_server, http_client, sleeps):
    photo_server.set_pages([[item("a1")]])
    client = list_client(f"{photo_server.photos_url}?approved=1", http_client, sleeps)

    assert client.page_url(2) == f"{photo_server.photos_url}?approved=1&page=2"
    assert client.fetch_listing().ids == ["a1"]
    assert page_requests(photo_server) == ["/photos.json?approved=1&page=1", "/photos.json?approved=1&page=2"]


def test_start_page_skips_earlier_pages(photo_server, photo_list):
    photo_server.set_pages([[item("a1")], [item("b2")]])

    listing = photo_list.fetch_listing(start_page=2)

    assert listing.ids == ["b2"]
    assert page_requests(photo_server) == ["/photos.json?page=2", "/photos.json?page=3"]


def test_end_page_cut_marks_the_listing_incomplete(photo_server, photo_list):
    photo_server.set_pages([[item("a1")], [item("b2")]])

    listing = photo_list.fetch_listing(end_page=1)

    assert listing.ids == ["a1"]
    assert not listing.complete and listing.error is None
    assert page_requests(photo_server) == ["/photos.json?page=1"]


def test_end_page_past_the_last_page_is_still_complete(photo_server, photo_list):
    photo_server.set_pages([[item("a1")]])

    assert photo_list.fetch_listing(end_page=10).complete


def test_limit_counts_valid_items_and_stops_paging(photo_server, photo_list):
    photo_server.set_pages([[item("a1"), {"no": "filename"}, item("b2")], [item("c3"), item("d4")], [item("e5")]])

    listing = photo_list.fetch_listing(limit=3)

    assert listing.ids == ["a1", "b2", "c3"]
    assert not listing.complete
    assert page_requests(photo_server) == ["/photos.json?page=1", "/photos.json?page=2"]


def test_duplicates_are_counted_and_the_first_wins(photo_server, photo_list):
    photo_server.set_pages(
        [[item("a1", "https://x.invalid/first"), item("b2")], [item("a1", "https://x.invalid/second")]]
    )

    listing = photo_list.fetch_listing()

    assert listing.ids == ["a1", "b2"]
    assert listing.items[0].url == "https://x.invalid/first"
    assert listing.duplicates == 1


# --- validation -----------------------------------------------------------------------------


def test_unsafe_and_malformed_items_are_reported_not_listed(photo_server, photo_list):
    bad = demo_bad_items(photo_server)
    photo_server.set_pages([[item("good1"), *bad, {"filename": "x" * 500}, {"filename": 7, "exportable_url": None}]])

    listing = photo_list.fetch_listing()

    # The bad items with valid ids (html body, 404, ftp url) are listed: they fail later, at download.
    assert listing.ids == ["good1", demo_id("bad-html"), demo_id("bad-404"), demo_id("bad-ftp")]
    reasons = {entry.index: entry.reason for entry in listing.invalid}
    assert all(entry.page == 1 for entry in listing.invalid)
    for index, name in enumerate(["../escape", "a/b", ".hidden", "dot.name", "comma,id", LOOKALIKE_ID], start=1):
        assert repr(name) in reasons[index], reasons[index]
    assert reasons[7].startswith("item is not an object: ['not', 'an', 'object']")
    assert reasons[8].startswith("item has no filename")
    long_reason = reasons[len(bad) + 1]
    assert "'xxxx" in long_reason and "..." in long_reason and len(long_reason) < 250
    assert "not a string (int)" in reasons[len(bad) + 2]
    assert len(listing.invalid) == 10
    assert listing.complete  # invalid items do not make the list incomplete


def test_a_non_string_url_is_kept_as_absent(photo_server, photo_list):
    photo_server.set_pages([[{"filename": "a1", "exportable_url": 42}, {"filename": "b2"}]])

    assert photo_list.fetch_listing().items == [PhotoItem("a1", None), PhotoItem("b2", None)]


# --- retries --------------------------------------------------------------------------------


def test_429_with_retry_after_seconds_is_honoured(photo_server, photo_list, sleeps, lines):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=429, retry_after="7"))

    assert photo_list.fetch_page(1) == [item("a1")]
    assert sleeps.calls == [7.0]  # far above the 0.01 s backoff and the 0.1 s cap: the server asked
    assert any("attempt 1 failed: HTTP 429; retrying in 7s" in line for line in lines)


def test_503_with_retry_after_http_date_is_honoured(photo_server, photo_list, sleeps):
    photo_server.set_pages([[item("a1")]])
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    photo_server.add_fault(
        "/photos.json?page=1", Fault("status", status=503, retry_after=email.utils.format_datetime(when, usegmt=True))
    )

    assert photo_list.fetch_page(1) == [item("a1")]
    assert len(sleeps.calls) == 1 and 25 <= sleeps.calls[0] <= 30


def test_5xx_is_retried_with_exponential_backoff(photo_server, photo_list, sleeps):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=502, times=3))

    assert photo_list.fetch_page(1) == [item("a1")]
    assert sleeps.calls == [0.01, 0.02, 0.04]
    assert len(page_requests(photo_server)) == 4


@pytest.mark.parametrize("kind", ["garbage", "truncate"])
def test_unparsable_and_truncated_bodies_are_retried(photo_server, photo_list, sleeps, kind):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault(kind))

    assert photo_list.fetch_page(1) == [item("a1")]
    assert len(sleeps.calls) == 1


def test_timeouts_are_retried(photo_server, impatient_client, sleeps, lines):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("timeout"))
    client = list_client(photo_server.photos_url, impatient_client, sleeps, log=lines.append)

    assert client.fetch_page(1) == [item("a1")]
    assert len(sleeps.calls) == 1 and any("ReadTimeout" in line for line in lines)


def test_a_refused_connection_gets_only_the_short_refused_budget(http_client, sleeps):
    with PhotoServer() as gone:
        url = gone.photos_url  # a port nobody listens on once the server stops
    client = list_client(url, http_client, sleeps)

    with pytest.raises(PhotoListError, match="ConnectError") as raised:
        client.fetch_page(1)
    assert f"{url}?page=1" in str(raised.value) and "refused 3 time(s)" in str(raised.value)
    assert sleeps.calls == [FAST_RETRY.refused_delay_s] * FAST_RETRY.refused_retries


def test_persistent_failure_gives_up_within_the_total_wait_budget(photo_server, http_client, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=503, times=-1))
    policy = RetryPolicy(retries=20, backoff_base_s=1.0, backoff_cap_s=60.0, max_total_wait_s=10.0)
    client = list_client(photo_server.photos_url, http_client, sleeps, policy)

    with pytest.raises(PhotoListError) as raised:
        client.fetch_page(1)

    assert sleeps.calls == [1.0, 2.0, 4.0]  # the next wait (8 s) would pass the 10 s budget
    message = str(raised.value)
    assert f"{photo_server.photos_url}?page=1" in message and "HTTP 503" in message and "budget" in message
    assert len(page_requests(photo_server)) == 4


def test_a_retry_after_beyond_the_budget_gives_up_instead_of_waiting(photo_server, photo_list, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=429, retry_after="3600"))

    with pytest.raises(PhotoListError, match="3600s more would exceed"):
        photo_list.fetch_page(1)
    assert sleeps.calls == []


def test_attempts_are_bounded_by_retries(photo_server, http_client, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=500, times=-1))
    policy = RetryPolicy(retries=2, backoff_base_s=0.0)
    client = list_client(photo_server.photos_url, http_client, sleeps, policy)

    with pytest.raises(PhotoListError, match="gave up after 3 attempt"):
        client.fetch_page(1)
    assert len(page_requests(photo_server)) == 3


def test_other_4xx_fails_at_once(photo_server, photo_list, sleeps):
    photo_server.add_fault("/photos.json?page=1", Fault("status", status=404))

    with pytest.raises(PhotoListError, match="HTTP 404"):
        photo_list.fetch_page(1)
    assert sleeps.calls == [] and len(page_requests(photo_server)) == 1


def test_a_json_object_page_is_retried_and_recovers(photo_server, photo_list, sleeps, lines):
    photo_server.set_pages([[item("a1")]])
    photo_server.add_fault("/photos.json?page=1", Fault("not_array", times=1))

    assert photo_list.fetch_page(1) == [item("a1")]
    assert len(sleeps.calls) == 1 and len(page_requests(photo_server)) == 2
    assert any("attempt 1 failed: expected a JSON array, got dict" in line for line in lines)


def test_a_page_that_stays_an_object_ends_the_listing_incomplete(photo_server, photo_list, sleeps):
    photo_server.set_pages([[item("a1")], [item("b2")]])
    photo_server.add_fault("/photos.json?page=2", Fault("not_array", times=-1))

    listing = photo_list.fetch_listing()

    assert listing.ids == ["a1"] and not listing.complete
    assert f"{photo_server.photos_url}?page=2: expected a JSON array, got dict" in listing.error
    assert f"gave up after {FAST_RETRY.attempts} attempt(s)" in listing.error
    assert len(sleeps.calls) == FAST_RETRY.retries


def test_a_failed_page_ends_the_listing_incomplete_without_raising(photo_server, photo_list):
    photo_server.set_pages([[item("a1")], [item("b2")], [item("c3")]])
    photo_server.add_fault("/photos.json?page=2", Fault("status", status=500, times=-1))

    listing = photo_list.fetch_listing()

    assert listing.ids == ["a1"]
    assert not listing.complete
    assert f"{photo_server.photos_url}?page=2" in listing.error and "HTTP 500" in listing.error
    assert listing.pages_fetched == 1
    assert "/photos.json?page=3" not in photo_server.requests  # never skips past a failed page (B11)


# --- Retry-After and backoff arithmetic ----------------------------------------------------------


def test_parse_retry_after():
    now = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 5 ") == 5.0
    assert parse_retry_after("Fri, 01 May 2026 12:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Fri, 01 May 2026 11:00:00 GMT", now=now) == 0.0  # never negative
    for unusable in (None, "", "soon", "-5", "1.5", "٣"):
        assert parse_retry_after(unusable, now=now) is None, unusable


def test_retry_delay_caps_backoff_but_honours_a_longer_retry_after():
    policy = RetryPolicy(backoff_base_s=1.0, backoff_cap_s=60.0)
    assert [retry_delay(policy, n, None) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(policy, 3, 2.0) == 8.0
    assert retry_delay(policy, 0, 90.0) == 90.0


# --- snapshots ------------------------------------------------------------------------------


def test_listing_round_trips_through_its_snapshot_file(tmp_path, photo_server, photo_list):
    photo_server.set_pages([[item("b2"), item("a1", "https://x.invalid/a1"), "junk"]])
    listing = photo_list.fetch_listing()
    path = tmp_path / "state" / "photo_list.json"

    save_listing(path, listing)

    assert load_listing(path) == listing
    assert json.loads(path.read_text())["digest"] == listing.digest
    assert [entry.name for entry in path.parent.iterdir()] == ["photo_list.json"]  # no temporaries left


def test_digest_depends_on_the_set_of_ids_only():
    def listing(ids: list[str]) -> PhotoListing:
        return PhotoListing([PhotoItem(i, None) for i in ids], [], 0, 1, True, None, "2026-01-01T00:00:00+00:00")

    assert listing(["a1", "b2"]).digest == listing(["b2", "a1"]).digest
    assert listing(["a1", "b2"]).digest != listing(["a1", "b3"]).digest


def test_a_missing_or_unreadable_snapshot_loads_as_none(tmp_path):
    assert load_listing(tmp_path / "absent.json") is None
    (tmp_path / "corrupt.json").write_text("{not json")
    assert load_listing(tmp_path / "corrupt.json") is None
    (tmp_path / "wrong.json").write_text('{"items": 3}')
    assert load_listing(tmp_path / "wrong.json") is None
