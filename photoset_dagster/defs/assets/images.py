"""The per-image assets, partitioned by ``image_id``, as one subsettable multi-asset.

Why one multi-asset rather than six assets: every stage records one materialization per image and
emits no op output (so a failed image is never falsely materialized). Dagster skips a downstream
*op* whose upstream emitted no output, so separate assets could not run together in one run. Inside
one op the stages run in order, in one process, each model loaded once; selecting a subset (e.g.
only ``vae_latents``) runs only that stage (and the facts it reads) and loads only that model.

Each asset has a partition-scoped ``artefact_valid`` check, evaluated per image where the artefact
is made (so one bad image fails its own partition's check, not a range's), and on demand: selecting
only the checks verifies the selected partitions without computing anything.
"""


import contextlib
from collections.abc import Iterator, Mapping

import dagster as dg

from ...core.photolist import PhotoItem, load_listing
from ...core.verify import judge_image
from ...stages.base import APPROVED_LINKS, CAPTIONS, DINOV3, IMAGE_FACTS, STAGE_KINDS, STAGES, T5, VAE
from ...stages.pipeline import SyncWork
from ...stages.sync import SyncOptions
from ..execution import ModelResources, run_and_record
from ..partitions import image_ids
from ..recorder import CHECK_NAME
from ..resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model
from .sync import OWNERS

SPEC_TEXT: dict[str, tuple[str, str, list[str], set[str]]] = {
    # stage: (group, description, upstream stages, kinds)
    APPROVED_LINKS: (
        "sync",
        "data/raw/<id> downloaded from the listing's exportable_url (concurrent, atomic, size-capped, bounded "
        "in time) and the extension-correct link data/approved/<id>.<ext> -> ../raw/<id>, type detected from "
        "magic bytes.",
        [],
        {"python", "file"},
    ),
    IMAGE_FACTS: (
        "embeddings",
        "Per image: width/height after EXIF orientation, aspect bucket (7 seed buckets), format, colour profile, "
        "raw sha256 and stat fingerprint (data/derived/facts/<id>.json). Decodes the file once, safely: corrupt "
        "files fail here with a reason.",
        [APPROVED_LINKS],
        {"python", "json"},
    ),
    CAPTIONS: (
        "embeddings",
        "Gemma 3 caption with the seed's prompt, one dense paragraph (data/derived/captions/<id>.json, with "
        "provenance). Empty or failed captions are errors retried next run, never stored.",
        [IMAGE_FACTS],
        {"pytorch", "json"},
    ),
    DINOV3: (
        "embeddings",
        "DINOv3 ViT-L/16 CLS embedding, (1024,) float32 (data/derived/dinov3/<id>.npy + provable sidecar); "
        "optional patch tokens at bucket resolution, taken after CLS and the 4 register tokens.",
        [IMAGE_FACTS],
        {"pytorch", "numpy"},
    ),
    VAE: (
        "embeddings",
        "Flux VAE latents, (16, H/8, W/8) float16, of the image cover-cropped to its bucket "
        "(data/derived/vae_latents/<id>.npy + provable sidecar).",
        [IMAGE_FACTS],
        {"pytorch", "numpy"},
    ),
    T5: (
        "embeddings",
        "T5-Large encoder hidden states of the caption, (77, 1024) float16, and its attention mask "
        "(data/derived/t5_hidden/<id>.npy + sidecar holding the mask).",
        [CAPTIONS],
        {"pytorch", "numpy"},
    ),
}
# The stages whose artefacts a check judges (the link's truth is the sync's own outcome).
CHECKED_STAGES = tuple(stage for stage in STAGES if stage != APPROVED_LINKS)


class ImagePipelineConfig(dg.Config):
    """Run options (the seed's flags that make sense per run)."""

    force: bool = False  # recompute even when the artefact is current
    dry_run: bool = False  # sync only: report what would be downloaded/linked, change nothing
    stop_after_links: int | None = None
    progress_every: int = 1000
    tolerate_failures: bool = False  # end the run successfully even when images failed (they still show why)


def sync_work(photoset: PhotosetConfig, stack: contextlib.ExitStack, items: list[PhotoItem],
              options: SyncOptions) -> SyncWork:
    """The sync stage's inputs, with an HTTP client that lives as long as ``stack``."""
    client = stack.enter_context(photoset.http_client())
    return SyncWork(items, photoset.downloader(client), options)


def listed_items(photoset: PhotosetConfig, ids: list[str]) -> list[PhotoItem]:
    """The download URL of each id, from the saved photo-list snapshot."""
    listing = load_listing(photoset.layout.photo_list_path)
    urls = {item.image_id: item.url for item in listing.items} if listing else {}
    return [PhotoItem(image_id, urls.get(image_id)) for image_id in ids]


def build_image_assets(code_versions: Mapping[str, str]) -> dg.AssetsDefinition:
    """``code_versions`` (stage -> recipe hash) make Dagster flag artefacts whose recipe changed."""
    specs = [
        dg.AssetSpec(
            stage,
            group_name=group,
            description=description,
            deps=deps,
            kinds=kinds,
            owners=OWNERS,
            skippable=True,
            code_version=code_versions.get(stage),
        )
        for stage, (group, description, deps, kinds) in SPEC_TEXT.items()
    ]
    checks = [
        dg.AssetCheckSpec(
            CHECK_NAME, asset=stage, partitions_def=image_ids,
            description=f"The {STAGE_KINDS[stage]} artefact of the image is present, is the file its provable "
            "record describes, and was made with the recipe and inputs in force; a failure carries the reason.",
        )
        for stage in CHECKED_STAGES
    ]

    @dg.multi_asset(
        name="image_pipeline",
        specs=specs,
        check_specs=checks,
        partitions_def=image_ids,
        can_subset=True,
        # One run per contiguous range of a selection (what `dagster asset materialize --partition-range`
        # needs): every model loads once per run, and a crash loses nothing (the next run resumes).
        backfill_policy=dg.BackfillPolicy.single_run(),
        description="Per-image stages, run in order in one process so each model loads once per run.",
    )
    def image_pipeline(
        context: dg.AssetExecutionContext,
        config: ImagePipelineConfig,
        photoset: PhotosetConfig,
        dinov3: Dinov3Model,
        captioner: CaptionModel,
        flux_vae: FluxVaeModel,
        t5: T5Model,
    ):
        selected = {key.to_user_string() for key in context.selected_asset_keys}
        stages = [stage for stage in STAGES if stage in selected]
        checked = [key.asset_key.to_user_string() for key in context.selected_asset_check_keys]
        keys = list(context.partition_keys)
        models = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5)
        if not stages:  # only checks selected: judge what is on disk, compute nothing
            yield from verify_partitions(photoset, models, checked, keys)
            return
        context.log.info(f"image pipeline: {len(keys)} images, stages {', '.join(stages)}")
        options = SyncOptions(dry_run=config.dry_run, stop_after_links=config.stop_after_links,
                              progress_every=config.progress_every)
        with contextlib.ExitStack() as stack:
            sync = sync_work(photoset, stack, listed_items(photoset, keys), options) if APPROVED_LINKS in stages else None
            yield from run_and_record(
                context.op_execution_context, stages=stages, image_ids=keys, photoset=photoset, models=models,
                sync=sync, force=config.force, dry_run=config.dry_run, tolerate_failures=config.tolerate_failures,
                check_stages=checked,
            )

    return image_pipeline


def verify_partitions(
    photoset: PhotosetConfig, models: ModelResources, stages: list[str], keys: list[str]
) -> Iterator[dg.AssetCheckEvaluation]:
    """One evaluation per image and checked stage, from the same judgment ``verify`` and the stages use."""
    recipes = models.recipes()
    kinds = [STAGE_KINDS[stage] for stage in stages]
    for image_id in keys:
        judged = judge_image(photoset.layout, image_id, recipes, kinds)
        for stage in stages:
            judgment = judged[STAGE_KINDS[stage]]
            metadata = {} if judgment.valid else {"reason": dg.MetadataValue.text(judgment.reason),
                                                  "status": judgment.state}
            yield dg.AssetCheckEvaluation(dg.AssetKey(stage), CHECK_NAME, judgment.valid, partition=image_id,
                                          description=judgment.reason or None, metadata=metadata)
