"""Jobs: the image pipeline over partitions, catch-up over any scattered set, prune and verify.

Asset jobs cover what a person selects in the UI. The catch-up job exists because Dagster splits a
non-contiguous partition selection into one run per contiguous block (thousands of runs for
scattered re-runs); it finds the work itself and does it in one run, logging per-partition
materializations so the UI status stays true.
"""

from typing import Any

import dagster as dg

from ..core.buckets import BUCKET_NAMES
from ..core.photolist import load_listing
from ..core.prune import PruneRefused, execute_prune, plan_prune
from ..core.shards import ShardOptions
from ..core.sync import SyncOptions
from ..core.verify import verify_artefacts
from .assets.dataset import DATASET_JSONL, build_dataset, recipe_hashes, write_shards
from .assets.sync import PHOTO_LIST
from .partitions import IMAGE_ID_PARTITIONS_NAME, image_ids
from .photo_list import fetch_listing, listing_metadata, register_listing
from .pipeline import (
    APPROVED_LINKS,
    PASS_STAGES,
    STAGES,
    ModelResources,
    run_observations,
    run_image_pipeline,
    summaries_metadata,
)
from .resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model

image_pipeline_job = dg.define_asset_job(
    "image_pipeline_job",
    selection=dg.AssetSelection.assets(*STAGES),
    partitions_def=image_ids,
    executor_def=dg.in_process_executor,
    description=(
        "Sync, facts, captions, DINOv3, VAE and T5 for a range of image ids, in one process: each model "
        "loads once per run. Select fewer assets in the launchpad to run a single pass."
    ),
)

refresh_photo_list_job = dg.define_asset_job(
    "refresh_photo_list_job",
    selection=dg.AssetSelection.assets(PHOTO_LIST),
    description="Fetch the remote photo list and register new image ids as partitions.",
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


def _stages_for(passes: list[str]) -> list[str]:
    unknown = sorted(set(passes) - set(PASS_STAGES))
    if unknown:
        raise dg.Failure(f"unknown pass(es) {unknown}; choose from {sorted(PASS_STAGES)}")
    wanted = {stage for name in passes for stage in PASS_STAGES[name]}
    return [stage for stage in STAGES if stage in wanted]


def _unrecorded(instance: dg.DagsterInstance, stages: list[str], ids: list[str]) -> dict[str, set[str]]:
    wanted = set(ids)
    return {
        stage: wanted - instance.get_materialized_partitions(dg.AssetKey(stage)) for stage in stages
    }


@dg.op(
    pool="gpu",
    description="Find every image whose artefacts for the chosen passes are missing, failed or stale and "
    "process them all in this one run, in GPU batches.",
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
    stages = _stages_for(config.passes)
    urls = None
    listing_problem: dict[str, Any] = {}
    if config.refresh_list:
        listing = fetch_listing(
            photoset,
            start_page=config.start_page,
            end_page=config.end_page,
            limit=config.limit,
            log=context.log.info,
        )
        if config.dry_run:  # a dry run changes nothing: no snapshot, no new partitions
            urls = {item.image_id: item.url for item in listing.items}
        else:
            registration = register_listing(context.instance, photoset, listing)
            context.log_event(
                dg.AssetMaterialization(asset_key=PHOTO_LIST, metadata=listing_metadata(listing, registration))
            )
        if listing.error:
            context.log.warning(f"photo list incomplete: {listing.error}; continuing with the {len(listing.ids)} ids listed")
            listing_problem = {"photo_list_error": listing.error, "photo_list_photos": len(listing.ids)}
        candidates = listing.ids
        if APPROVED_LINKS not in stages:
            stages = [APPROVED_LINKS, *stages]
    else:
        candidates = context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    if config.image_ids:
        registered = set(context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
        unknown = [image_id for image_id in config.image_ids if image_id not in registered]
        if unknown:
            raise dg.Failure(f"{len(unknown)} image id(s) are not registered partitions, e.g. {unknown[:5]}")
        candidates = list(config.image_ids)
    if config.limit is not None:
        candidates = candidates[: config.limit]
    models = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5)
    summaries = yield from run_image_pipeline(
        context,
        candidates,
        stages,
        photoset,
        models,
        force=config.force,
        sync_options=SyncOptions(
            dry_run=config.dry_run, stop_after_links=config.stop_after_links, progress_every=config.progress_every
        ),
        unrecorded=_unrecorded(context.instance, stages, candidates),
        urls=urls,
    )
    yield from run_observations(summaries)
    metadata: dict[str, Any] = {"images": len(candidates), **summaries_metadata(summaries), **listing_problem}
    if config.build_dataset and not config.dry_run:
        dataset_metadata, problems = build_dataset(
            photoset, dinov3, captioner, flux_vae, t5, context.instance, context.log.info
        )
        context.log_event(dg.AssetMaterialization(asset_key=DATASET_JSONL, metadata=dataset_metadata))
        if problems:
            raise dg.Failure("the dataset JSONL failed verification", metadata={"problems": "\n".join(problems[:20])})
        metadata["shards"] = write_shards(
            context, photoset.layout, BUCKET_NAMES, ShardOptions(shard_size=config.shard_size)
        )["shards"]
    context.log.info(f"catch-up done: {metadata['images']} images, {metadata['failed_images']} failed")
    yield dg.Output(metadata["failed_images"], metadata=metadata)


@dg.job(
    executor_def=dg.in_process_executor,
    description="Catch up: process, in one run, every image whose artefacts for the chosen passes are missing, "
    "failed or stale (wherever it sits in partition order). Optionally refresh the photo list first and "
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
    pool="gpu",
    description="Remove links, records, derived files and partitions of images no longer on the list, then "
    "rebuild the affected buckets' shards. Only after a complete listing; guarded against mass deletion.",
)
def prune(context: dg.OpExecutionContext, config: PruneConfig, photoset: PhotosetConfig):
    layout = photoset.layout
    if config.refresh_list:
        listing = fetch_listing(photoset, log=context.log.info)
        register_listing(context.instance, photoset, listing)
    else:
        listing = load_listing(layout.photo_list_path)
        if listing is None:
            raise dg.Failure("no photo list snapshot yet: run the photo_list asset (or prune with refresh_list)")
    try:
        plan = plan_prune(layout, listing.ids, listing_complete=listing.complete)
    except PruneRefused as error:
        raise dg.Failure(str(error)) from error
    for line in plan.summary_lines():
        context.log.info(line)
    max_fraction = photoset.prune_max_fraction if config.max_fraction is None else config.max_fraction
    try:
        report = execute_prune(layout, plan, dry_run=config.dry_run, max_fraction=max_fraction, force=config.force)
    except PruneRefused as error:
        raise dg.Failure(str(error)) from error
    for line in report.summary_lines():
        context.log.info(line)
    if not config.dry_run:
        registered = set(context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME))
        for image_id in report.removed_ids:
            if image_id in registered:
                context.instance.delete_dynamic_partition(IMAGE_ID_PARTITIONS_NAME, image_id)
        if report.affected_buckets:
            write_shards(context, layout, sorted(report.affected_buckets), ShardOptions(shard_size=config.shard_size))
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
    kinds: list[str] = ["facts", "captions", "dinov3", "vae_latents", "t5_hidden"]


@dg.op(description="Load and check every artefact; fail if any is invalid, missing or stale.")
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
    report = verify_artefacts(layout, ids, recipe_hashes(dinov3, captioner, flux_vae, t5), kinds=config.kinds)
    for line in report.summary_lines():
        context.log.info(line)
    counts = {
        kind: {"valid": r.valid, "invalid": len(r.invalid), "missing": len(r.missing), "stale": len(r.stale)}
        for kind, r in report.kinds.items()
    }
    if not report.ok:
        raise dg.Failure("verification found invalid, missing or stale artefacts", metadata={"counts": counts})
    yield dg.Output(counts)


@dg.job(
    description="Verify (the seed's --verify): every artefact present, loadable, of the recorded shape and dtype, "
    "finite, made with the recipe in force; the run fails otherwise, so it works as a health check.",
    tags={"photoset/kind": "verify"},
)
def verify_job():
    verify()
