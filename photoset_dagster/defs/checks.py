"""Asset checks on every per-image asset: the file is there, loads, has the recorded shape and dtype,
is finite, and (for T5) its mask matches the hidden rows. Run them from the UI on any partitions, or
all at once with the verify job."""

import dagster as dg

from ..core.verify import check_artefact
from .partitions import image_ids
from .pipeline import CAPTIONS, DINOV3, IMAGE_FACTS, T5, VAE
from .resources import PhotosetConfig

STAGE_KINDS = {IMAGE_FACTS: "facts", CAPTIONS: "captions", DINOV3: "dinov3", VAE: "vae_latents", T5: "t5_hidden"}
MAX_LISTED = 50


def _build_check(stage: str, kind: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage,
        name="artefact_valid",
        partitions_def=image_ids,
        blocking=True,
        description=f"Every {kind} artefact of the selected partitions loads and matches its recorded recipe.",
    )
    def artefact_valid(context: dg.AssetCheckExecutionContext, photoset: PhotosetConfig) -> dg.AssetCheckResult:
        layout = photoset.layout
        problems = {
            image_id: reason
            for image_id in context.partition_keys
            if (reason := check_artefact(layout, kind, image_id)) is not None
        }
        listed = "\n".join(f"{image_id}: {reason}" for image_id, reason in list(problems.items())[:MAX_LISTED])
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "checked": len(context.partition_keys),
                "invalid": len(problems),
                "problems": dg.MetadataValue.text(listed or "none"),
            },
        )

    return artefact_valid


artefact_checks = [_build_check(stage, kind) for stage, kind in STAGE_KINDS.items()]
