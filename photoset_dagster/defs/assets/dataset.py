"""The dataset group: the Stage-2 JSONL over every ready image, and WebDataset shards per bucket."""

import os
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    NULL_EVENT_POINTER,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from ...core.artefacts import Recipe, sha256_file
from ...core.dataset import DatasetGuard, build_dataset_jsonl
from ...core.layout import DataLayout
from ...core.preflight import PreflightError, check_free_space
from ...core.records import holds_stage1_records, iter_jsonl, migrate_stage1
from ...core.near_duplicates import duplicates_to_exclude, near_duplicates_path, read_clusters
from ...core.shards import (
    DatasetRecords,
    ShardError,
    ShardOptions,
    ShardRefused,
    read_dataset_records,
    write_bucket_shards,
)
from ...core.verify import verify_dataset_jsonl
from ...stages.base import CAPTIONS, DINOV3, IMAGE_FACTS, T5, VAE
from ..execution import ModelResources
from ..metadata import markdown_table
from ..partitions import IMAGE_ID_PARTITIONS_NAME, aspect_buckets
from ..resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model
from .sync import OWNERS

DATASET_JSONL = "dataset_jsonl"
WEBDATASET_SHARDS = "webdataset_shards"
DATASET_DEPS = (IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5)
PREVIEW_ROWS = 8
RECORD_BYTES = 4096  # a Stage-2 line with its 77- to 512-long mask, for the disk preflight


def migrate_stage1_if_present(layout: DataLayout, recipes: Mapping[str, Recipe], log) -> dict[str, Any]:
    """A JSONL of the original scripts (Stage 1 or their Stage 2) is imported into artefacts before the
    rebuild, so its captions and embeddings are kept, not replaced."""
    if not holds_stage1_records(layout.dataset_jsonl):
        return {}
    report = migrate_stage1(layout, dinov3_recipe=recipes["dinov3"], caption_recipe=recipes["captions"])
    for line in report.summary_lines():
        log(line)
    return {"stage1_migrated": len(report.migrated), "stage1_failed": len(report.failed)}


def _preview(layout: DataLayout) -> dg.MetadataValue:
    rows = []
    for _, record, _ in iter_jsonl(layout.dataset_jsonl):
        if record is None:
            continue
        rows.append((record["image_id"], record["aspect_bucket"], record["image_path"], record["caption"][:160]))
        if len(rows) >= PREVIEW_ROWS:
            break
    return markdown_table(("image_id", "bucket", "image", "caption"), rows)


def build_dataset(
    photoset: PhotosetConfig,
    models: ModelResources,
    instance: dg.DagsterInstance,
    log,
    *,
    force: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Migrate Stage 1 if present, rebuild the JSONL, verify it; returns (metadata, problems). A rebuild
    that would drop records only because the recipe in force changed is refused (DatasetGuard -> Failure)."""
    layout = photoset.layout
    layout.ensure_dirs()
    recipes = models.recipes()
    ids = instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    try:
        check_free_space(layout.root, len(ids) * RECORD_BYTES * (1 + photoset.jsonl_backups), photoset.min_free_gb,
                         "the dataset JSONL")
        migration = migrate_stage1_if_present(layout, recipes, log)
        report = build_dataset_jsonl(layout, ids, recipes, backups=photoset.jsonl_backups,
                                     max_drop_fraction=photoset.prune_max_fraction, force=force)
    except DatasetGuard as refusal:
        raise dg.Failure(description=str(refusal), metadata={"refused": True}) from refusal
    except PreflightError as refusal:
        raise dg.Failure(description=str(refusal)) from refusal
    for line in report.summary_lines():
        log(line)
    problems = verify_dataset_jsonl(layout)
    metadata = {
        "records": report.records,
        "not_ready": sum(report.not_ready.values()),
        "not_ready_reasons": markdown_table(("reason", "images"), sorted(report.not_ready.items())),
        "not_ready_examples": markdown_table(("image_id", "reason"), report.not_ready_examples[:20]),
        "buckets": markdown_table(("bucket", "images"), sorted(report.buckets.items())),
        "bytes": report.bytes,
        "content_sha256": sha256_file(report.path),
        "seconds": round(report.seconds, 3),
        "recipes": dg.MetadataValue.json({kind: recipe.as_dict() for kind, recipe in recipes.items()}),
        "path": dg.MetadataValue.path(str(report.path)),
        "preview": _preview(layout),
        "problems": len(problems),
        **migration,
    }
    return metadata, problems


class DatasetConfig(dg.Config):
    force: bool = False  # rebuild even when records would be dropped because the recipe changed


def jsonl_check(problems: list[str]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="jsonl_valid",
        passed=not problems,
        metadata={"problems": len(problems), "first_problems": dg.MetadataValue.text("\n".join(problems[:20]) or "none")},
    )


@dg.asset(
    name=DATASET_JSONL,
    group_name="dataset",
    deps=list(DATASET_DEPS),
    kinds={"python", "json"},
    owners=OWNERS,
    # Blocking: the shards (the next step) never pack a JSONL that failed verification.
    check_specs=[dg.AssetCheckSpec("jsonl_valid", asset=DATASET_JSONL, blocking=True)],
    description=(
        "data/derived/approved_image_dataset.jsonl in the seed's Stage-2 form (image_id, image_path, caption, "
        "t5_attention_mask, height, width, aspect_bucket, format_version 2) plus provenance, one record per "
        "ready image, sorted by id, replaced atomically with bounded backups. A Stage-1 file is migrated first. "
        "Images that are not ready (missing, invalid or stale artefacts) are counted with reasons; a rebuild "
        "that would drop records only because the recipe changed is refused unless forced."
    ),
)
def dataset_jsonl(
    context: dg.AssetExecutionContext,
    config: DatasetConfig,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
) -> dg.MaterializeResult:
    models = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5)
    metadata, problems = build_dataset(photoset, models, context.instance, context.log.info, force=config.force)
    return dg.MaterializeResult(metadata=metadata, check_results=[jsonl_check(problems)],
                                data_version=dg.DataVersion(str(metadata["content_sha256"])))


def dataset_materialization(instance: dg.DagsterInstance, metadata: Mapping[str, Any]) -> dg.AssetMaterialization:
    """``dataset_jsonl``'s materialization for a step that builds it without being its asset (the catch-up
    job), with the provenance Dagster records for the asset itself: without it the UI would call the
    dataset out of date for every image that cannot be processed."""
    tags = {CODE_VERSION_TAG: "photoset-dataset", DATA_VERSION_TAG: str(metadata["content_sha256"])}
    for dep in DATASET_DEPS:
        records = instance.fetch_materializations(dg.AssetKey(dep), limit=1).records
        latest = records[0] if records else None
        version = latest.asset_materialization.tags.get(DATA_VERSION_TAG) if latest else None
        tags[get_input_data_version_tag(dg.AssetKey(dep))] = version or "UNKNOWN"
        tags[get_input_event_pointer_tag(dg.AssetKey(dep))] = str(latest.storage_id) if latest else NULL_EVENT_POINTER
    return dg.AssetMaterialization(asset_key=DATASET_JSONL, metadata=dict(metadata), tags=tags)


class ShardConfig(dg.Config):
    """The seed's create_webdataset_shards.py options."""

    shard_size: int = 1000
    shuffle: bool = False
    seed: int = 1337
    limit: int | None = None
    dry_run: bool = False
    force: bool = False  # allow shrinking or emptying a bucket's shards beyond photoset.prune_max_fraction


def shard_options(config: ShardConfig, photoset: PhotosetConfig) -> ShardOptions:
    return ShardOptions(shard_size=config.shard_size, shuffle=config.shuffle, seed=config.seed, limit=config.limit,
                        dry_run=config.dry_run, force=config.force, max_shrink_fraction=photoset.prune_max_fraction)


def write_shards(
    context: dg.OpExecutionContext,
    photoset: PhotosetConfig,
    buckets: Iterable[str],
    options: ShardOptions,
    recipes: Mapping[str, Recipe],
) -> dict[str, Any]:
    """Write the given buckets' shards, logging one materialization per bucket partition."""
    layout = photoset.layout
    if not layout.dataset_jsonl.is_file():
        raise dg.Failure(
            description=f"no dataset yet ({layout.dataset_jsonl} is missing): materialize dataset_jsonl first "
            "(photoset migrate)"
        )
    records = read_dataset_records(layout)
    if photoset.exclude_near_duplicates:
        excluded = duplicates_to_exclude(read_clusters(near_duplicates_path(layout)), records)
        records = DatasetRecords([r for r in records if r.get("image_id") not in excluded], records.malformed_lines)
        context.log.info(f"leaving {len(excluded)} near-duplicate image(s) out of the shards (one per cluster stays)")
    buckets = list(buckets)
    if not options.dry_run:
        payload = sum(os.path.getsize(layout.npy_path(kind, r["image_id"])) for r in records
                      if r.get("aspect_bucket") in buckets for kind in ("dinov3", "vae_latents", "t5_hidden")
                      if layout.npy_path(kind, r["image_id"]).is_file())
        try:
            check_free_space(layout.root, payload, photoset.min_free_gb, "the shards")
        except PreflightError as refusal:
            raise dg.Failure(description=str(refusal)) from refusal
    totals = {"samples": 0, "shards": 0, "bytes": 0, "rewritten": 0, "removed_stale": 0}
    for bucket in buckets:
        try:
            report = write_bucket_shards(layout, bucket, records, options, recipes)
        except ShardRefused as refusal:
            raise dg.Failure(description=str(refusal), metadata={"refused": True}) from refusal
        except ShardError as error:
            raise dg.Failure(description=f"bucket {bucket}: {error}") from error
        for line in report.summary_lines():
            context.log.info(line)
        totals["samples"] += report.samples
        totals["shards"] += len(report.shards)
        totals["bytes"] += report.bytes
        totals["rewritten"] += report.rewritten
        totals["removed_stale"] += len(report.removed_stale)
        if not options.dry_run:
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=WEBDATASET_SHARDS,
                    partition=bucket,
                    metadata={
                        "samples": report.samples,
                        "shards": len(report.shards),
                        "bytes": report.bytes,
                        "rewritten": report.rewritten,
                        "unchanged": report.unchanged,
                        "removed_stale": len(report.removed_stale),
                        "index": dg.MetadataValue.path(str(report.index_path)) if report.index_path else "",
                        "directory": dg.MetadataValue.path(str(layout.bucket_shard_dir(bucket))),
                    },
                )
            )
    return totals


@dg.asset(
    name=WEBDATASET_SHARDS,
    group_name="dataset",
    deps=[DATASET_JSONL],
    partitions_def=aspect_buckets,
    backfill_policy=dg.BackfillPolicy.single_run(),
    output_required=False,
    kinds={"python", "webdataset"},
    owners=OWNERS,
    description=(
        "WebDataset tar shards per aspect bucket: data/shards/bucket_WxH/shard-NNNNNN.tar (1,000 samples each by "
        "default, uncompressed) with <id>.json, <id>.dinov3.npy, <id>.vae.npy, <id>.t5.npy per sample, plus a "
        "wids-style index.json. Unchanged shards are kept, stale extra shards removed, recipes never mixed, every "
        "array checked against its proof as it is packed; shrinking a bucket beyond the prune guard is refused."
    ),
)
def webdataset_shards(
    context: dg.AssetExecutionContext,
    config: ShardConfig,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
):
    recipes = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5).recipes()
    totals = write_shards(context.op_execution_context, photoset, context.partition_keys,
                          shard_options(config, photoset), recipes)
    context.log.info("done: " + " ".join(f"{name}={value}" for name, value in totals.items()))
    yield from ()
