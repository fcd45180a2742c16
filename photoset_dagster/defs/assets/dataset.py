"""The dataset group: the Stage-2 JSONL over every ready image, and WebDataset shards per bucket."""

from collections.abc import Iterable
from typing import Any

import dagster as dg

from ...core.records import holds_stage1_records, iter_jsonl, migrate_stage1
from ...core.dataset import build_dataset_jsonl
from ...core.layout import DataLayout
from ...core.shards import ShardError, ShardOptions, read_dataset_records, write_bucket_shards
from ...core.verify import verify_dataset_jsonl
from ..partitions import IMAGE_ID_PARTITIONS_NAME, aspect_buckets
from ..metadata import markdown_table
from ..pipeline import CAPTIONS, DINOV3, IMAGE_FACTS, T5, VAE
from ..resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model
from .sync import OWNERS

DATASET_JSONL = "dataset_jsonl"
WEBDATASET_SHARDS = "webdataset_shards"
PREVIEW_ROWS = 8


def recipe_hashes(dinov3: Dinov3Model, captioner: CaptionModel, flux_vae: FluxVaeModel, t5: T5Model) -> dict[str, str]:
    """The recipe in force per artefact kind: the dataset and shards accept only artefacts made with it."""
    return {
        "captions": captioner.settings().recipe().hash,
        "dinov3": dinov3.settings().recipe().hash,
        "vae_latents": flux_vae.settings().recipe().hash,
        "t5_hidden": t5.settings().recipe().hash,
    }


def migrate_stage1_if_present(layout: DataLayout, dinov3: Dinov3Model, captioner: CaptionModel, log) -> dict[str, Any]:
    """A JSONL of the original scripts (Stage 1 or their Stage 2) is imported into artefacts before the
    rebuild, so its captions and embeddings are kept, not replaced."""
    if not holds_stage1_records(layout.dataset_jsonl):
        return {}
    report = migrate_stage1(
        layout, dinov3_recipe=dinov3.settings().recipe(), caption_recipe=captioner.settings().recipe()
    )
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
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
    instance: dg.DagsterInstance,
    log,
) -> tuple[dict[str, Any], list[str]]:
    """Migrate Stage 1 if present, rebuild the JSONL, verify it; returns (metadata, problems)."""
    layout = photoset.layout
    layout.ensure_dirs()
    migration = migrate_stage1_if_present(layout, dinov3, captioner, log)
    report = build_dataset_jsonl(
        layout,
        instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME),
        recipe_hashes(dinov3, captioner, flux_vae, t5),
        backups=photoset.jsonl_backups,
    )
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
        "seconds": round(report.seconds, 3),
        "recipes": dg.MetadataValue.json(report.recipes),
        "path": dg.MetadataValue.path(str(report.path)),
        "preview": _preview(layout),
        "problems": len(problems),
        **migration,
    }
    return metadata, problems


@dg.asset(
    name=DATASET_JSONL,
    group_name="dataset",
    deps=[IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5],
    kinds={"python", "json"},
    owners=OWNERS,
    check_specs=[dg.AssetCheckSpec("jsonl_valid", asset=DATASET_JSONL, blocking=True)],
    description=(
        "data/derived/approved_image_dataset.jsonl in the seed's Stage-2 form (image_id, image_path, caption, "
        "t5_attention_mask, height, width, aspect_bucket, format_version 2) plus provenance, one record per "
        "ready image, sorted by id, replaced atomically with bounded backups. A Stage-1 file is migrated first. "
        "Images that are not ready (missing or stale artefacts) are counted with reasons."
    ),
)
def dataset_jsonl(
    context: dg.AssetExecutionContext,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
) -> dg.MaterializeResult:
    metadata, problems = build_dataset(
        photoset, dinov3, captioner, flux_vae, t5, context.instance, context.log.info
    )
    check = dg.AssetCheckResult(
        check_name="jsonl_valid",
        passed=not problems,
        metadata={"problems": len(problems), "first_problems": dg.MetadataValue.text("\n".join(problems[:20]) or "none")},
    )
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


class ShardConfig(dg.Config):
    """The seed's create_webdataset_shards.py options."""

    shard_size: int = 1000
    shuffle: bool = False
    seed: int = 1337
    limit: int | None = None
    dry_run: bool = False


def write_shards(
    context: dg.OpExecutionContext, layout: DataLayout, buckets: Iterable[str], options: ShardOptions
) -> dict[str, Any]:
    """Write the given buckets' shards, logging one materialization per bucket partition."""
    if not layout.dataset_jsonl.is_file():
        raise dg.Failure(
            description=f"no dataset yet ({layout.dataset_jsonl} is missing): materialize dataset_jsonl first "
            "(photoset migrate)"
        )
    records = read_dataset_records(layout)
    totals = {"samples": 0, "shards": 0, "bytes": 0, "rewritten": 0, "removed_stale": 0}
    for bucket in buckets:
        try:
            report = write_bucket_shards(layout, bucket, records, options)
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
        "wids-style index.json. Unchanged shards are kept, stale extra shards removed, recipes never mixed."
    ),
)
def webdataset_shards(context: dg.AssetExecutionContext, config: ShardConfig, photoset: PhotosetConfig):
    options = ShardOptions(
        shard_size=config.shard_size, shuffle=config.shuffle, seed=config.seed, limit=config.limit, dry_run=config.dry_run
    )
    totals = write_shards(context.op_execution_context, photoset.layout, context.partition_keys, options)
    context.log.info("done: " + " ".join(f"{name}={value}" for name, value in totals.items()))
    yield from ()
