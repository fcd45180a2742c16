"""Fetching the remote photo list and registering its ids as partitions (used by the asset, the
sensor, the nightly job and the CLI alike)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ..core.atomic import atomic_write_json
from ..core.http import RetryPolicy
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
    policy: RetryPolicy | None = None,
    page_timeout_s: float | None = None,
    time_budget_s: float | None = None,
) -> PhotoListing:
    """The remote list; ``policy``, ``page_timeout_s`` and ``time_budget_s`` tighten the photoset
    settings for a caller with little time (a sensor tick)."""
    with photoset.http_client() as client:
        photo_list_client = PhotoListClient(
            photoset.photos_url, client, policy or photoset.retry_policy, log=log, allow_http=photoset.allow_http,
            page_timeout_s=page_timeout_s or photoset.page_timeout_s,
        )
        return photo_list_client.fetch_listing(start_page=start_page, end_page=end_page, limit=limit,
                                               time_budget_s=time_budget_s)


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
    """Save the snapshot and the report of invalid entries, and add new ids as partitions in one bulk
    call (the sensor-request path costs ~161 s for 60k keys; one ``add_dynamic_partitions`` call costs
    well under a second)."""
    layout = photoset.layout
    layout.ensure_dirs()
    snapshot = merge_into_snapshot(load_listing(layout.photo_list_path), listing)
    save_listing(layout.photo_list_path, snapshot)
    atomic_write_json(invalid_entries_path(photoset), {
        "fetched_at": listing.fetched_at, "entries": listing.entries, "invalid": [asdict(i) for i in listing.invalid]})
    registered = set(instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
    new_ids = [image_id for image_id in listing.ids if image_id not in registered]
    if new_ids:
        instance.add_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME, new_ids)
    listed = set(listing.ids)
    removed = sorted(registered - listed) if listing.complete else []
    return Registration(new_ids=new_ids, removed_ids=removed, snapshot=snapshot)


def invalid_entries_path(photoset: PhotosetConfig) -> Path:
    return photoset.layout.state_dir / "invalid_list_entries.json"


def listing_summary_lines(listing: PhotoListing) -> list[str]:
    """The list's counters, as the seed printed its own: entries, images, what was skipped and why."""
    reasons = Counter(entry.reason.split(":")[0] for entry in listing.invalid)
    lines = [
        "Photo list:",
        f"  {'entries:':<18}{listing.entries}",
        f"  {'images:':<18}{len(listing.items)}",
        f"  {'invalid entries:':<18}{len(listing.invalid)}",
        f"  {'duplicate ids:':<18}{listing.duplicates}",
        f"  {'complete:':<18}{'yes' if listing.complete else 'no: ' + (listing.error or 'cut by --limit/--end-page')}",
    ]
    lines += [f"    invalid, {reason}: {count}" for reason, count in reasons.most_common()]
    return lines


def listing_metadata(listing: PhotoListing, registration: Registration | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "entries": listing.entries,
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
