"""The sync stage end to end against a real loopback server and a real data root."""

from __future__ import annotations

import os

import pytest

from photoset_dagster.core.download import Downloader
from photoset_dagster.core.http import RetryPolicy
from photoset_dagster.core.layout import DataLayout
from photoset_dagster.core.photolist import PhotoItem, PhotoListClient
from photoset_dagster.stages.base import Note
from photoset_dagster.stages.sync import SyncOptions, SyncStats, run_sync_stage
from photoset_dagster.demo.catalog import demo_id, load_demo
from photoset_dagster.demo.server import Fault, PhotoServer
from photoset_dagster_tests.fixtures_http import FAST_RETRY, image_bytes, tree_entries

PNG, JPEG, GIF = image_bytes("PNG"), image_bytes("JPEG"), image_bytes("GIF")


def serve(server: PhotoServer, bodies: dict[str, bytes]) -> list[PhotoItem]:
    for image_id, body in bodies.items():
        server.set_file(image_id, body)
    return [PhotoItem(image_id, server.file_url(image_id)) for image_id in bodies]


def run(items, layout, downloader, **options) -> tuple[SyncStats, list[str]]:
    """The stage's counters, plus what its outcomes say: ``linked`` (id -> ext) and ``failures`` (id -> why)."""
    lines: list[str] = []
    stats = SyncStats()
    stats.linked, stats.failures = {}, {}
    for item in run_sync_stage(items, layout, downloader, SyncOptions(**options), stats=stats):
        if isinstance(item, Note):
            lines.append(item.message)
        elif item.ok and item.record is not None:
            stats.linked[item.image_id] = item.record["ext"]
        elif not item.ok:
            stats.failures[item.image_id] = item.reason
    return stats, lines


def file_requests(server: PhotoServer) -> list[str]:
    return [path for path in server.requests if path.startswith("/files/")]


def counters(stats: SyncStats) -> dict[str, int]:
    names = ["processed", "downloaded", "download_failed", "missing_raw", "unknown_type"]
    names += ["symlink_created", "symlink_updated", "symlink_unchanged"]
    return {name: getattr(stats, name) for name in names if getattr(stats, name)}


def test_downloads_missing_raws_and_links_them_by_type(photo_server, layout, downloader):
    items = serve(photo_server, {"aa1": PNG, "bb2": JPEG, "cc3": GIF})

    stats, _ = run(items, layout, downloader)

    assert counters(stats) == {"processed": 3, "downloaded": 3, "symlink_created": 3}
    assert stats.linked == {"aa1": "png", "bb2": "jpg", "cc3": "gif"}
    assert stats.failures == {} and stats.bytes_downloaded == len(PNG) + len(JPEG) + len(GIF)
    assert layout.raw_path("bb2").read_bytes() == JPEG
    assert os.readlink(layout.approved_dir / "bb2.jpg") == "../raw/bb2"
    assert sorted(os.listdir(layout.raw_dir)) == ["aa1", "bb2", "cc3"]  # no temporaries


def test_a_rerun_downloads_nothing_and_leaves_links_unchanged(photo_server, layout, downloader):
    items = serve(photo_server, {"aa1": PNG, "bb2": JPEG})
    run(items, layout, downloader)
    requests_before = len(file_requests(photo_server))

    stats, _ = run(items, layout, downloader)

    assert counters(stats) == {"processed": 2, "symlink_unchanged": 2}
    assert stats.linked == {"aa1": "png", "bb2": "jpg"}
    assert len(file_requests(photo_server)) == requests_before


def test_a_changed_raw_type_replaces_the_link(photo_server, layout, downloader):
    items = serve(photo_server, {"aa1": PNG})
    run(items, layout, downloader)
    layout.raw_path("aa1").write_bytes(JPEG)

    stats, _ = run(items, layout, downloader)

    assert stats.symlink_updated == 1 and stats.linked == {"aa1": "jpg"}
    assert sorted(os.listdir(layout.approved_dir)) == ["aa1.jpg"]


def test_an_unknown_raw_type_is_counted_and_not_linked(layout, downloader):
    layout.raw_path("aa1").write_bytes(b"%PDF-1.7 not an image")
    layout.raw_path("bb2").write_bytes(PNG)

    stats, lines = run([PhotoItem("aa1", None), PhotoItem("bb2", None)], layout, downloader)

    assert counters(stats) == {"processed": 2, "unknown_type": 1, "symlink_created": 1}
    assert stats.failures == {"aa1": "raw file is not a supported image type"}
    assert os.listdir(layout.approved_dir) == ["bb2.png"]
    assert "warning: aa1: raw file is not a supported image type" in lines


def test_a_directory_where_the_link_belongs_fails_that_id_only(layout, downloader):
    for image_id in ("aa1", "bb2"):
        layout.raw_path(image_id).write_bytes(PNG)
    (layout.approved_dir / "aa1.png").mkdir()

    stats, _ = run([PhotoItem("aa1", None), PhotoItem("bb2", None)], layout, downloader)

    assert stats.failures["aa1"].startswith("cannot link: a directory occupies")
    assert stats.linked == {"bb2": "png"} and stats.symlink_created == 1


def test_missing_url_and_refused_urls_count_as_missing_raw(photo_server, layout, http_client, sleeps):
    photo_server.set_file("cc3", PNG)
    https_only = Downloader(http_client, FAST_RETRY, sleep=sleeps)
    items = [
        PhotoItem("aa1", None),
        PhotoItem("bb2", "ftp://127.0.0.1/x"),
        PhotoItem("cc3", photo_server.file_url("cc3")),  # plain http, refused by this downloader
    ]

    stats, _ = run(items, layout, https_only)

    assert counters(stats) == {"processed": 3, "missing_raw": 3}
    assert stats.failures["aa1"] == "raw file missing and the item has no exportable_url"
    assert "scheme 'ftp'" in stats.failures["bb2"] and "scheme 'http'" in stats.failures["cc3"]
    assert photo_server.requests == []
    assert os.listdir(layout.raw_dir) == []


def test_failed_downloads_are_counted_and_leave_no_raw(photo_server, layout, downloader):
    items = serve(photo_server, {"aa1": PNG, "bb2": PNG})
    items.append(PhotoItem("cc3", photo_server.file_url("never-served")))
    photo_server.add_fault("/files/bb2", Fault("garbage", times=-1))

    stats, _ = run(items, layout, downloader)

    assert counters(stats) == {"processed": 3, "downloaded": 1, "download_failed": 2, "symlink_created": 1}
    assert stats.failures == {
        "bb2": "download failed: not a supported image (starts with b'<!doctype html><')",
        "cc3": "download failed: HTTP 404",
    }
    assert os.listdir(layout.raw_dir) == ["aa1"]


def test_an_interrupted_download_completes_on_the_next_run(photo_server, layout, http_client):
    items = serve(photo_server, {"aa1": PNG})
    photo_server.add_fault("/files/aa1", Fault("truncate", times=1))
    no_retries = Downloader(http_client, RetryPolicy(retries=0), allow_http=True)

    first, _ = run(items, layout, no_retries)
    assert first.download_failed == 1 and os.listdir(layout.raw_dir) == []

    second, _ = run(items, layout, no_retries)
    assert second.downloaded == 1 and second.linked == {"aa1": "png"}


def test_a_symlink_at_raw_is_a_failure_and_never_followed(layout, downloader, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    os.symlink(outside, layout.raw_path("aa1"))

    stats, _ = run([PhotoItem("aa1", "https://cdn.invalid/aa1")], layout, downloader)

    assert counters(stats) == {"processed": 1, "missing_raw": 1}
    assert "is a symlink" in stats.failures["aa1"]
    assert os.listdir(layout.approved_dir) == [] and outside.read_bytes() == PNG


def test_dry_run_changes_nothing_on_disk(photo_server, layout, downloader):
    layout.raw_path("aa1").write_bytes(JPEG)
    os.symlink("../raw/aa1", layout.approved_dir / "aa1.png")  # stale extension: would be updated
    layout.raw_path("bb2").write_bytes(PNG)  # not linked yet: would be created
    items = [PhotoItem("aa1", None), PhotoItem("bb2", None), *serve(photo_server, {"cc3": PNG})]
    before = tree_entries(layout.root)

    stats, lines = run(items, layout, downloader, dry_run=True)

    assert tree_entries(layout.root) == before
    assert photo_server.requests == []
    assert counters(stats) == {"processed": 3, "symlink_created": 1, "symlink_updated": 1}
    assert stats.linked == {"aa1": "jpg", "bb2": "png"}
    assert f"dry-run: would download cc3 from {photo_server.file_url('cc3')}" in lines


def test_dry_run_creates_no_folders(photo_server, tmp_path, downloader):
    fresh = DataLayout(tmp_path / "fresh")

    run(serve(photo_server, {"aa1": PNG}), fresh, downloader, dry_run=True)

    assert not fresh.root.exists()


def test_limit_caps_processed_items(photo_server, layout, downloader):
    items = serve(photo_server, {f"id{n}": PNG for n in range(5)})

    stats, _ = run(items, layout, downloader, limit=2)

    assert counters(stats) == {"processed": 2, "downloaded": 2, "symlink_created": 2}
    assert sorted(file_requests(photo_server)) == ["/files/id0", "/files/id1"]  # fetched concurrently


def test_stop_after_links_stops_at_the_nth_new_link_without_extra_downloads(photo_server, layout, downloader):
    items = serve(photo_server, {f"id{n}": PNG for n in range(6)})
    layout.raw_path("id0").write_bytes(PNG)
    os.symlink("../raw/id0", layout.approved_dir / "id0.png")  # already linked: does not count
    layout.raw_path("id2").write_bytes(PNG)
    os.symlink("../raw/id2", layout.approved_dir / "id2.png")

    stats, _ = run(items, layout, downloader, stop_after_links=2)

    assert counters(stats) == {"processed": 4, "downloaded": 2, "symlink_created": 2, "symlink_unchanged": 2}
    assert sorted(file_requests(photo_server)) == ["/files/id1", "/files/id3"]


def test_progress_lines_every_n_items(photo_server, layout, downloader):
    items = serve(photo_server, {f"id{n}": PNG for n in range(5)})
    items.insert(1, PhotoItem("nourl", None))

    _, lines = run(items, layout, downloader, progress_every=3)

    assert [line for line in lines if line.startswith("progress:")] == [
        "progress: processed=3 downloaded=2 missing_raw=1 download_failed=0 unknown_type=0 created=2 updated=0",
        "progress: processed=6 downloaded=5 missing_raw=1 download_failed=0 unknown_type=0 created=5 updated=0",
    ]
    _, lines = run(items, layout, downloader, progress_every=0)
    assert not [line for line in lines if line.startswith("progress:")]


def test_verbose_logs_each_download_and_new_link(photo_server, layout, downloader):
    stats, lines = run(serve(photo_server, {"aa1": PNG}), layout, downloader, verbose=True)

    assert f"downloaded: aa1 ({len(PNG) / 1024:.1f} KB)" in lines
    assert f"created: {layout.approved_dir / 'aa1.png'} -> ../raw/aa1" in lines


def test_summary_lines_match_the_seed_format():
    stats = SyncStats(processed=2500, downloaded=118, download_failed=3, missing_raw=5, symlink_created=2492)

    assert stats.summary_lines() == [
        "Summary:",
        "  processed:        2500",
        "  downloaded:       118",
        "  download failed:  3",
        "  missing raw:      5",
        "  unknown type:     0",
        "  symlink created:  2492",
        "  symlink updated:  0",
        "  symlink unchanged:0",
    ]


@pytest.fixture
def demo(photo_server):
    return load_demo(photo_server, page_size=7)


def test_the_demo_list_syncs_every_good_photo_and_nothing_else_is_written(
    demo, photo_server, layout, downloader, http_client, sleeps, tmp_path
):
    before = tree_entries(tmp_path)

    listing = PhotoListClient(photo_server.photos_url, http_client, FAST_RETRY, sleep=sleeps, allow_http=True).fetch_listing()
    stats, _ = run(listing.items, layout, downloader)

    assert listing.complete and len(listing.invalid) == 8
    assert stats.linked == {photo.image_id: photo.expected_ext for photo in demo}
    assert set(stats.failures) == {demo_id("bad-html"), demo_id("bad-404"), demo_id("bad-ftp")}
    assert (stats.download_failed, stats.missing_raw) == (2, 1)
    # The whole tmp tree: exactly one raw file and one link per good photo appeared, nothing else
    # (an unsafe name like "../escape" would have landed in data/ or above it).
    after = tree_entries(tmp_path)
    new_entries = {path for path in after if path not in before}
    expected = {f"data/raw/{photo.image_id}" for photo in demo}
    expected |= {f"data/approved/{photo.image_id}.{photo.expected_ext}" for photo in demo}
    assert new_entries == expected
    assert {path: after[path] for path in before} == before
