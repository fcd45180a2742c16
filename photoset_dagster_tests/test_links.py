"""The symlink view (core/links.py): one extension-correct link per id, nothing followed out of the root."""

from __future__ import annotations

import os

import pytest

from photoset_dagster.core.layout import DataLayout, InvalidImageId
from photoset_dagster.core.links import (
    LinkError,
    ensure_approved_link,
    remove_approved_links,
    scan_approved_links,
    scan_approved_links_for,
)
from photoset_dagster_tests.fixtures_http import tree_entries


@pytest.fixture
def raw(layout):
    path = layout.raw_path("abc")
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def test_creates_a_relative_link_to_the_raw_file(layout, raw):
    assert ensure_approved_link(layout, "abc", "png") == "created"

    link = layout.approved_dir / "abc.png"
    assert os.readlink(link) == "../raw/abc"
    assert link.resolve() == raw.resolve()


def test_a_second_call_is_unchanged(layout, raw):
    ensure_approved_link(layout, "abc", "png")
    before = tree_entries(layout.root)

    assert ensure_approved_link(layout, "abc", "png") == "unchanged"
    assert tree_entries(layout.root) == before


def test_an_absolute_link_to_the_same_raw_counts_as_unchanged(layout, raw):
    os.symlink(raw, layout.approved_dir / "abc.png")

    assert ensure_approved_link(layout, "abc", "png") == "unchanged"


def test_a_new_extension_replaces_the_old_link(layout, raw):
    ensure_approved_link(layout, "abc", "png")

    assert ensure_approved_link(layout, "abc", "jpg") == "updated"
    assert scan_approved_links_for(layout, "abc") == ["jpg"]
    assert not os.path.lexists(layout.approved_dir / "abc.png")


def test_an_extra_alias_link_is_removed_even_when_the_right_one_exists(layout, raw):
    ensure_approved_link(layout, "abc", "jpg")
    os.symlink("../raw/abc", layout.approved_dir / "abc.jpeg")

    assert ensure_approved_link(layout, "abc", "jpg") == "updated"
    assert scan_approved_links(layout) == {"abc": ["jpg"]}


@pytest.mark.parametrize("occupant", ["wrong-link", "broken-link", "regular-file"])
def test_whatever_else_holds_the_name_is_replaced(layout, raw, occupant):
    link = layout.approved_dir / "abc.png"
    if occupant == "wrong-link":
        os.symlink("../raw/other", link)
    elif occupant == "broken-link":
        os.symlink("../raw/missing/deeper", link)
    else:
        link.write_bytes(b"stray")

    assert ensure_approved_link(layout, "abc", "png") == "updated"
    assert os.readlink(link) == "../raw/abc"


def test_a_directory_in_the_way_raises_link_error(layout, raw):
    (layout.approved_dir / "abc.png").mkdir()

    with pytest.raises(LinkError, match="a directory occupies"):
        ensure_approved_link(layout, "abc", "png")
    assert (layout.approved_dir / "abc.png").is_dir()


def test_dry_run_reports_the_same_status_and_changes_nothing(layout, raw):
    before = tree_entries(layout.root)
    assert ensure_approved_link(layout, "abc", "png", dry_run=True) == "created"
    assert tree_entries(layout.root) == before

    ensure_approved_link(layout, "abc", "png")
    before = tree_entries(layout.root)
    assert ensure_approved_link(layout, "abc", "jpg", dry_run=True) == "updated"
    assert tree_entries(layout.root) == before


def test_the_approved_folder_is_created_when_missing(tmp_path):
    layout = DataLayout(tmp_path / "fresh")
    assert ensure_approved_link(layout, "abc", "png") == "created"
    assert os.readlink(layout.approved_dir / "abc.png") == "../raw/abc"


def test_invalid_ids_are_refused_before_touching_the_disk(layout):
    before = tree_entries(layout.root.parent)
    for bad in ("../escape", "a/b", ".hidden"):
        with pytest.raises(InvalidImageId):
            ensure_approved_link(layout, bad, "png")
    assert tree_entries(layout.root.parent) == before


def test_scan_lists_only_links_named_like_valid_ids(layout, raw):
    ensure_approved_link(layout, "abc", "png")
    (layout.approved_dir / "file.png").write_bytes(b"not a link")
    os.symlink("../raw/abc", layout.approved_dir / ".hidden.png")
    os.symlink("../raw/abc", layout.approved_dir / "noext")
    os.symlink("../raw/abc", layout.approved_dir / "two.tar.gz")

    assert scan_approved_links(layout) == {"abc": ["png"]}


def test_remove_approved_links(layout, raw):
    ensure_approved_link(layout, "abc", "png")

    assert remove_approved_links(layout, "abc", dry_run=True) == [layout.approved_dir / "abc.png"]
    assert scan_approved_links_for(layout, "abc") == ["png"]
    assert remove_approved_links(layout, "abc") == [layout.approved_dir / "abc.png"]
    assert scan_approved_links_for(layout, "abc") == []
    assert raw.exists()

