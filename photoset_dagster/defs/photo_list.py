"""Fetching the remote photo list and registering its ids as partitions (used by the asset, the
sensor, the nightly job and the CLI alike)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from ..core.photolist import PhotoListClient, PhotoListing, load_listing, save_listing
from .metadata import markdown_table
from .partitions import IMAGE_ID_PARTITIONS_NAME
from .resources import PhotosetConfig

PHOTO_LIST = "photo_list"


def fetch_listing(
    photoset: PhotosetConfig,
    *,
    start_page: int = 1,
    end_page: int | None = None,
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PhotoListing:
    with photoset.http_client() as client:
        photo_list_client = PhotoListClient(photoset.photos_url, client, photoset.retry_policy, log=log)
        return photo_list_client.fetch_listing(start_page=start_page, end_page=end_page, limit=limit)


def merge_into_snapshot(previous: PhotoListing | None, listing: PhotoListing) -> PhotoListing:
    """A complete listing replaces the snapshot; a partial one (failed page, --limit, --end-page)
    only adds or refreshes its items, so it can never shrink the approved set prune relies on."""
    if listing.complete or previous is None:
        return listing
    by_id = {item.image_id: item for item in previous.items}
    for item in listing.items:
        by_id[item.image_id] = item
    return PhotoListing(
        items=list(by_id.values()),
        invalid=listing.invalid,
        duplicates=listing.duplicates,
        pages_fetched=listing.pages_fetched,
        complete=previous.complete,
        error=listing.error,
        fetched_at=listing.fetched_at,
    )


@dataclass(frozen=True)
class Registration:
    new_ids: list[str]
    removed_ids: list[str]  # registered partitions absent from a complete listing (prune candidates)
    snapshot: PhotoListing


def register_listing(instance: dg.DagsterInstance, photoset: PhotosetConfig, listing: PhotoListing) -> Registration:
    """Save the snapshot and add new ids as partitions in one bulk call (the sensor-request path
    costs ~161 s for 60k keys; one ``add_dynamic_partitions`` call costs well under a second)."""
    layout = photoset.layout
    layout.ensure_dirs()
    snapshot = merge_into_snapshot(load_listing(layout.photo_list_path), listing)
    save_listing(layout.photo_list_path, snapshot)
    registered = set(instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
    new_ids = [image_id for image_id in listing.ids if image_id not in registered]
    if new_ids:
        instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, new_ids)
    listed = set(listing.ids)
    removed = sorted(registered - listed) if listing.complete else []
    return Registration(new_ids=new_ids, removed_ids=removed, snapshot=snapshot)


def listing_metadata(listing: PhotoListing, registration: Registration | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "photos": len(listing.items),
        "digest": listing.digest,
        "complete": listing.complete,
        "pages_fetched": listing.pages_fetched,
        "invalid_items": len(listing.invalid),
        "duplicates": listing.duplicates,
        "invalid": markdown_table(("page", "index", "reason"), [(i.page, i.index, i.reason) for i in listing.invalid], limit=50),
    }
    if listing.error:
        metadata["error"] = dg.MetadataValue.text(listing.error)
    if registration is not None:
        metadata["new_partitions"] = len(registration.new_ids)
        metadata["no_longer_listed"] = len(registration.removed_ids)
    return metadata
