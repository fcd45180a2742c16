"""The sync group: the remote photo list (registered as partitions) and the approved-link view."""

import dagster as dg

from ..photo_list import PHOTO_LIST, fetch_listing, listing_metadata, register_listing
from ..concurrency import hold_run_lease
from ..resources import PhotosetConfig

OWNERS = ["team:photoset"]


class PhotoListConfig(dg.Config):
    """The seed's paging flags. Any of them makes the listing partial: partial listings add ids but
    never count as the complete approved list, so they can never trigger a prune."""

    start_page: int = 1
    end_page: int | None = None
    limit: int | None = None


@dg.asset(
    name=PHOTO_LIST,
    group_name="sync",
    kinds={"python", "json"},
    owners=OWNERS,
    description=(
        "The approved photo list, paged from photos.json until an empty page. Saves a snapshot "
        "(data/state/photo_list.json: ids, download URLs, digest, completeness), registers new ids as "
        "`image_id` partitions in one bulk call, and reports invalid items. Fails with a clear error if "
        "a page cannot be fetched after retries (what was listed so far is still registered)."
    ),
)
def photo_list(context: dg.AssetExecutionContext, config: PhotoListConfig, photoset: PhotosetConfig) -> dg.MaterializeResult:
    hold_run_lease(context.instance, context.run_id)  # a listing can take minutes: a kill in it must be seen
    listing = fetch_listing(
        photoset, start_page=config.start_page, end_page=config.end_page, limit=config.limit, log=context.log.info
    )
    registration = register_listing(context.instance, photoset, listing)
    metadata = listing_metadata(listing, registration)
    context.log.info(
        f"photo list: {len(listing.items)} photos, {len(registration.new_ids)} new partitions, "
        f"{len(listing.invalid)} invalid items, complete={listing.complete}"
    )
    if listing.error:
        raise dg.Failure(
            description=f"the photo list could not be fetched completely: {listing.error}",
            metadata=metadata,
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(listing.digest))
