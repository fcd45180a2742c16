"""The per-image assets, partitioned by ``image_id``, as one subsettable multi-asset.

Why one multi-asset rather than six assets: every stage logs one materialization per image and
emits no op output (so failed images stay missing, not falsely materialized). Dagster skips a
downstream *op* whose upstream emitted no output, so separate assets could not run together in one
run. Inside one op the stages run in order, in one process, each model loaded once; selecting a
subset (e.g. only ``vae_latents``) runs only that stage and loads only that model.
"""

from collections.abc import Mapping

import dagster as dg

from ...core.sync import SyncOptions
from ..partitions import image_backfill_policy, image_ids
from ..pipeline import (
    APPROVED_LINKS,
    CAPTIONS,
    DINOV3,
    IMAGE_FACTS,
    STAGES,
    T5,
    VAE,
    ModelResources,
    run_observations,
    run_image_pipeline,
)
from ..resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model
from .sync import OWNERS

SPEC_TEXT: dict[str, tuple[str, str, list[str], set[str]]] = {
    # stage: (group, description, upstream stages, kinds)
    APPROVED_LINKS: (
        "sync",
        "data/raw/<id> downloaded from the listing's exportable_url (concurrent, atomic, size-capped) and the "
        "extension-correct link data/approved/<id>.<ext> -> ../raw/<id>, type detected from magic bytes.",
        [],
        {"python", "file"},
    ),
    IMAGE_FACTS: (
        "embeddings",
        "Per image: width/height after EXIF orientation, aspect bucket (7 seed buckets), format, raw sha256 "
        "(data/derived/facts/<id>.json). Decodes the file once, safely: corrupt files fail here with a reason.",
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
        "DINOv3 ViT-L/16 CLS embedding, (1024,) float32 (data/derived/dinov3/<id>.npy + provenance sidecar); "
        "optional patch tokens at bucket resolution, taken after CLS and the 4 register tokens.",
        [IMAGE_FACTS],
        {"pytorch", "numpy"},
    ),
    VAE: (
        "embeddings",
        "Flux VAE latents, (16, H/8, W/8) float16, of the image cover-cropped to its bucket "
        "(data/derived/vae_latents/<id>.npy + provenance sidecar).",
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


class ImagePipelineConfig(dg.Config):
    """Run options (the seed's flags that make sense per run)."""

    force: bool = False  # recompute even when the artefact is current
    dry_run: bool = False  # sync only: report what would be downloaded/linked, change nothing
    stop_after_links: int | None = None
    progress_every: int = 1000


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

    @dg.multi_asset(
        name="image_pipeline",
        specs=specs,
        partitions_def=image_ids,
        can_subset=True,
        pool="gpu",
        backfill_policy=image_backfill_policy(),
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
        keys = list(context.partition_keys)
        context.log.info(f"image pipeline: {len(keys)} images, stages {', '.join(stages)}")
        summaries = yield from run_image_pipeline(
            context.op_execution_context,
            keys,
            stages,
            photoset,
            ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5),
            force=config.force,
            sync_options=SyncOptions(
                dry_run=config.dry_run,
                stop_after_links=config.stop_after_links,
                progress_every=config.progress_every,
            ),
        )
        yield from run_observations(summaries)

    return image_pipeline
