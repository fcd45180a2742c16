"""Jobs: the image pipeline over partitions, catch-up over any scattered set, prune and verify.

Asset jobs cover what a person selects in the UI. The catch-up job exists because Dagster splits a
non-contiguous partition selection into one run per contiguous block (thousands of runs for
scattered re-runs); it finds the work itself and does it in one run, recording every image exactly as
the assets do (same recorder), then optionally rebuilds the dataset and shards, and ends failed when
images failed so alerts fire — after the dataset of the good ones is built.
"""


import contextlib
from typing import Any

import dagster as dg

from ..core.buckets import BUCKET_NAMES
from ..core.photolist import PhotoItem, load_listing
from ..core.prune import PruneRefused, execute_prune, plan_prune
from ..core.shards import ShardOptions
from ..core.verify import DEFAULT_KINDS, verify_artefacts
from ..stages.base import APPROVED_LINKS, CAPTIONS, DINOV3, IMAGE_FACTS, STAGES, T5, VAE
from ..stages.sync import SyncOptions
from .assets.dataset import DATASET_JSONL, build_dataset, dataset_materialization, jsonl_check, write_shards
from .assets.images import CHECKED_STAGES, listed_items, sync_work
from .assets.sync import PHOTO_LIST
from .concurrency import hold_run_lease
from .execution import ModelResources, run_and_record
from .partitions import IMAGE_ID_PARTITIONS_NAME
from .photo_list import fetch_listing, listing_metadata, listing_summary_lines, register_listing
from .resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model

# The seed's --pass names.
PASS_STAGES: dict[str, tuple[str, ...]] = {
    "sync": (APPROVED_LINKS,),
    "facts": (IMAGE_FACTS,),
    "captions": (IMAGE_FACTS, CAPTIONS),
    "dinov3": (IMAGE_FACTS, DINOV3),
    "vae": (IMAGE_FACTS, VAE),
    "t5": (T5,),
    "all": (IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5),
}

image_pipeline_job = dg.define_asset_job(
    "image_pipeline_job",
    selection=dg.AssetSelection.assets(*STAGES),
    description=(
        "Sync, facts, captions, DINOv3, VAE and T5 for a range of image ids, in one process: each model "
        "loads once per run. Select fewer assets in the launchpad to run a single pass."
    ),
)

refresh_photo_list_job = dg.define_asset_job(
    "refresh_photo_list_job",
    selection=dg.AssetSelection.assets(PHOTO_LIST),
    description="Fetch the remote photo list (with its full retry budget) and register new image ids.",
)


class CatchUpConfig(dg.Config):
    passes: list[str] = ["all"]  # any of: sync, facts, captions, dinov3, vae, t5, all
    refresh_list: bool = False  # fetch the photo list first (new ids are registered)
    image_ids: list[str] = []  # restrict to these ids; empty = every registered id
    limit: int | None = None  # at most this many images
    start_page: int = 1
    end_page: int | None = None
    force: bool = False
    dry_run: bool = False
    stop_after_links: int | None = None
    progress_every: int = 1000
    build_dataset: bool = False  # then rebuild dataset_jsonl and every bucket's shards
    shard_size: int = 1000
    tolerate_failures: bool = False  # end successfully even when images failed


def stages_for(passes: list[str]) -> list[str]:
    unknown = sorted(set(passes) - set(PASS_STAGES))
    if unknown:
        raise dg.Failure(f"unknown pass(es) {unknown}; choose from {sorted(PASS_STAGES)}")
    wanted = {stage for name in passes for stage in PASS_STAGES[name]}
    return [stage for stage in STAGES if stage in wanted]


@dg.op(
    description="Find every image whose artefacts for the chosen passes are missing, invalid or stale and "
    "process them all in this one run, in model batches; record each image as the assets do.",
)
def catch_up(
    context: dg.OpExecutionContext,
    config: CatchUpConfig,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
):
    hold_run_lease(context.instance, context.run_id)  # from its first moment: a kill during listing is seen too
    stages = stages_for(config.passes)
    metadata: dict[str, Any] = {}
    items: list[PhotoItem] | None = None
    if config.refresh_list:
        listing = fetch_listing(photoset, start_page=config.start_page, end_page=config.end_page,
                                limit=config.limit, log=context.log.info)
        if not config.dry_run:  # a dry run changes nothing: no snapshot, no new partitions
            registration = register_listing(context.instance, photoset, listing)
            context.log_event(
                dg.AssetMaterialization(asset_key=PHOTO_LIST, metadata=listing_metadata(listing, registration)))
        for line in listing_summary_lines(listing):
            context.log.info(line)
        if listing.error:
            context.log.warning(f"photo list incomplete: {listing.error}; continuing with the {len(listing.ids)} ids listed")
            metadata.update(photo_list_error=listing.error, photo_list_photos=len(listing.ids))
        metadata.update(list_entries=listing.entries, invalid_entries=len(listing.invalid))
        candidates, items = listing.ids, listing.items
        if APPROVED_LINKS not in stages:
            stages = [APPROVED_LINKS, *stages]
    else:
        candidates = context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    if config.image_ids:
        registered = set(context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
        unknown = [image_id for image_id in config.image_ids if image_id not in registered]
        if unknown:
            raise dg.Failure(f"{len(unknown)} image id(s) are not registered partitions, e.g. {unknown[:5]}")
        candidates = list(dict.fromkeys(config.image_ids))
    if config.limit is not None:
        candidates = candidates[: config.limit]
    models = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5)
    options = SyncOptions(dry_run=config.dry_run, stop_after_links=config.stop_after_links,
                          progress_every=config.progress_every)
    with contextlib.ExitStack() as stack:
        if APPROVED_LINKS in stages:
            by_id = {item.image_id: item for item in items} if items is not None else {}
            sync_items = [by_id[i] for i in candidates if i in by_id] if items is not None else listed_items(photoset, candidates)
            sync = sync_work(photoset, stack, sync_items, options)
        else:
            sync = None
        summary = yield from run_and_record(
            context, stages=stages, image_ids=candidates, photoset=photoset, models=models, sync=sync,
            force=config.force, dry_run=config.dry_run, tolerate_failures=True,
            check_stages=[stage for stage in stages if stage in CHECKED_STAGES],
        )
    if sync is not None:
        for line in sync.stats.summary_lines():
            context.log.info(line)
    metadata.update(summary.metadata())
    if config.build_dataset and not config.dry_run:
        dataset_metadata, problems = build_dataset(photoset, models, context.instance, context.log.info)
        context.log_event(dataset_materialization(context.instance, dataset_metadata))
        check = jsonl_check(problems)
        yield dg.AssetCheckEvaluation(dg.AssetKey(DATASET_JSONL), check.check_name, check.passed, check.metadata)
        if problems:
            raise dg.Failure("the dataset JSONL failed verification", metadata={"problems": "\n".join(problems[:20])})
        metadata["dataset_records"] = dataset_metadata["records"]
        metadata["shards"] = write_shards(context, photoset, BUCKET_NAMES, ShardOptions(
            shard_size=config.shard_size, max_shrink_fraction=photoset.prune_max_fraction), models.recipes())["shards"]
    context.log.info(f"catch-up done: {summary.images} images, {len(summary.failed)} failed")
    if summary.failed and not config.tolerate_failures and not config.dry_run:
        raise dg.Failure(description=summary.failure_message(), metadata=metadata)
    yield dg.Output(len(summary.failed), metadata=metadata)


@dg.job(
    description="Catch up: process, in one run, every image whose artefacts for the chosen passes are missing, "
    "invalid or stale (wherever it sits in partition order). Optionally refresh the photo list first and "
    "rebuild the dataset and shards after. The nightly schedule runs it.",
    tags={"photoset/kind": "catch-up"},
)
def catch_up_job():
    catch_up()


class PruneConfig(dg.Config):
    dry_run: bool = False
    force: bool = False  # allow deleting more than max_fraction of the dataset
    max_fraction: float | None = None  # default: the photoset resource's prune_max_fraction
    refresh_list: bool = True  # fetch the list now; False = use the snapshot the sensor just saved
    shard_size: int = 1000


@dg.op(
    description="Remove links, records, derived files and partitions of images no longer on the list, then "
    "rebuild the affected buckets' shards. Only after a complete listing; guarded against mass deletion. A "
    "dry run, or a refused prune, changes nothing on disk (the saved list included).",
)
def prune(context: dg.OpExecutionContext, config: PruneConfig, photoset: PhotosetConfig,
          dinov3: Dinov3Model, captioner: CaptionModel, flux_vae: FluxVaeModel, t5: T5Model):
    hold_run_lease(context.instance, context.run_id)
    layout = photoset.layout
    if config.refresh_list:
        listing = fetch_listing(photoset, log=context.log.info)
    else:
        listing = load_listing(layout.photo_list_path)
        if listing is None:
            raise dg.Failure("no photo list snapshot yet: run the photo_list asset (or prune with refresh_list)")
    max_fraction = photoset.prune_max_fraction if config.max_fraction is None else config.max_fraction
    try:
        plan = plan_prune(layout, listing.ids, listing_complete=listing.complete)
    except PruneRefused as error:  # no complete list: the prune could not be done at all
        raise dg.Failure(description=str(error)) from error
    for line in plan.summary_lines():
        context.log.info(line)
    try:
        report = execute_prune(layout, plan, dry_run=config.dry_run, max_fraction=max_fraction, force=config.force)
    except PruneRefused as error:  # the mass-deletion guard
        raise dg.Failure(description=str(error), metadata={"refused": True}) from error
    for line in report.summary_lines():
        context.log.info(line)
    if not config.dry_run:
        if config.refresh_list:
            register_listing(context.instance, photoset, listing)
        registered = set(context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
        for image_id in report.removed_ids:
            if image_id in registered:
                context.instance.delete_dynamic_partition(IMAGE_ID_PARTITIONS_NAME, image_id)
        if report.affected_buckets:
            recipes = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5).recipes()
            # A prune shrinks shards on purpose: its own guard already bounded how much.
            write_shards(context, photoset, sorted(report.affected_buckets),
                         ShardOptions(shard_size=config.shard_size, force=True), recipes)
    yield dg.Output(len(report.removed_ids))


@dg.job(
    description="Prune: when images leave the photo list, delete their links, JSONL records, every derived "
    "file and their partitions, and rebuild the affected shards. Refuses after an incomplete listing and "
    "refuses to delete more than a set fraction unless forced. Dry-run lists everything and changes nothing.",
    tags={"photoset/kind": "prune"},
)
def prune_job():
    prune()


class VerifyConfig(dg.Config):
    kinds: list[str] = list(DEFAULT_KINDS)
    strict: bool = False  # images that cannot be processed (a recorded failure) count as problems too
    deep: bool = False  # hash every array, not only those whose size or mtime moved


@dg.op(description="Judge every artefact; fail if any is invalid, stale or not done yet (see strict).")
def verify(
    context: dg.OpExecutionContext,
    config: VerifyConfig,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
):
    layout = photoset.layout
    ids = context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    recipes = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5).recipes()
    report = verify_artefacts(layout, ids, recipes, kinds=config.kinds, strict=config.strict, deep=config.deep)
    for line in report.summary_lines():
        context.log.info(line)
    counts = {
        kind: {"valid": r.valid, "invalid": len(r.invalid), "stale": len(r.stale), "missing": len(r.missing),
               "cannot_process": len(r.cannot_process)}
        for kind, r in report.kinds.items()
    }
    if not report.ok:
        raise dg.Failure("verification found invalid, stale or missing artefacts", metadata={"counts": counts})
    yield dg.Output(counts)


@dg.job(
    description="Verify (the seed's --verify): every artefact present, the file its provable record describes, "
    "made with the recipe in force; images that failed for a reason are listed, not counted, unless strict.",
    tags={"photoset/kind": "verify"},
)
def verify_job():
    verify()
