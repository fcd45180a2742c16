"""The report group: thumbnails, near-duplicate clusters and the visual dataset report.

People who curate a training set would rather look than read: one self-contained HTML page
(``data/reports/dataset_report.html``) shows the images per bucket with their captions, the bucket,
caption-length and T5-token histograms, the failed images with their reasons, the recipe in force and
the near-duplicate clusters side by side. The asset's metadata links it and shows a few thumbnails.
"""

import base64
import itertools
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ...core.lock import data_lock
from ...core.dataset import read_status
from ...core.near_duplicates import find_near_duplicates, near_duplicates_path, read_clusters
from ...core.records import iter_jsonl
from ...core.report import build_report
from ...core.thumbnails import make_thumbnails
from ...stages.base import APPROVED_LINKS, DINOV3
from ..execution import ModelResources
from ..metadata import markdown_table
from ..partitions import IMAGE_ID_PARTITIONS_NAME
from ..resources import CaptionModel, Dinov3Model, FluxVaeModel, PhotosetConfig, T5Model
from .dataset import DATASET_JSONL
from .sync import OWNERS

THUMBNAILS = "thumbnails"
NEAR_DUPLICATES = "near_duplicates"
DATASET_REPORT = "dataset_report"
GALLERY_SIZE = 12  # thumbnails inlined in the report asset's metadata (the UI renders Markdown images)


def _records(photoset: PhotosetConfig) -> Iterator[dict[str, Any]]:
    path = photoset.layout.dataset_jsonl
    if path.is_file():
        yield from (record for _, record, _ in iter_jsonl(path) if record is not None)


@dg.asset(
    name=THUMBNAILS,
    group_name="report",
    deps=[APPROVED_LINKS],
    kinds={"python", "webp"},
    owners=OWNERS,
    description="A small WebP preview of every registered image (data/derived/thumbnails/<id>.webp, longest side "
    "256 px, upright), made once and redone only when its raw file changes.",
)
def thumbnails(context: dg.AssetExecutionContext, photoset: PhotosetConfig) -> dg.MaterializeResult:
    layout = photoset.layout
    ids = context.instance.get_dynamic_partitions(IMAGE_ID_PARTITIONS_NAME)
    with data_lock(layout.lock_path, exclusive=False, what="thumbnails"):
        report = make_thumbnails(layout, ids)
    for line in report.summary_lines():
        context.log.info(line)
    return dg.MaterializeResult(metadata={
        "made": len(report.ids("made")), "current": len(report.ids("current")), "failed": len(report.ids("failed")),
        "seconds": round(report.seconds, 2), "directory": dg.MetadataValue.path(str(layout.thumbnails_dir)),
    })


@dg.asset(
    name=NEAR_DUPLICATES,
    group_name="report",
    deps=[DATASET_JSONL, DINOV3],
    kinds={"python", "json"},
    owners=OWNERS,
    description="Exact duplicates (same raw sha256) and near-duplicates (DINOv3 cosine similarity above "
    "photoset.near_duplicate_threshold), grouped into clusters: data/derived/near_duplicates.jsonl (cluster id, "
    "members, similarity). With photoset.exclude_near_duplicates the shards keep one image per cluster.",
)
def near_duplicates(context: dg.AssetExecutionContext, photoset: PhotosetConfig) -> dg.MaterializeResult:
    report = find_near_duplicates(photoset.layout, _records(photoset), threshold=photoset.near_duplicate_threshold)
    for line in report.summary_lines():
        context.log.info(line)
    rows = [(c.cluster_id, c.kind, len(c.members), f"{c.min_similarity:.3f}", ", ".join(c.members[:6]))
            for c in report.clusters]
    return dg.MaterializeResult(metadata={
        "clusters": len(report.clusters),
        "images_in_clusters": sum(len(c.members) for c in report.clusters),
        "embedded": report.embedded,
        "threshold": report.threshold,
        "seconds": round(report.seconds, 2),
        "table": markdown_table(("cluster", "kind", "size", "min similarity", "members"), rows, limit=30),
        "path": dg.MetadataValue.path(str(report.path)),
    })


@dg.asset(
    name=DATASET_REPORT,
    group_name="report",
    deps=[DATASET_JSONL, THUMBNAILS, NEAR_DUPLICATES],
    kinds={"python", "html"},
    owners=OWNERS,
    description="data/reports/dataset_report.html: one self-contained page (no network needed) with a thumbnail "
    "grid per bucket and captions, histograms of buckets, caption lengths and T5 tokens (share truncated), failed "
    "images with reasons, the recipe in force and stale counts, and near-duplicate clusters side by side.",
)
def dataset_report(
    context: dg.AssetExecutionContext,
    photoset: PhotosetConfig,
    dinov3: Dinov3Model,
    captioner: CaptionModel,
    flux_vae: FluxVaeModel,
    t5: T5Model,
) -> dg.MaterializeResult:
    layout = photoset.layout
    recipes = ModelResources(dinov3=dinov3, captioner=captioner, flux_vae=flux_vae, t5=t5).recipes()
    status = read_status(layout)
    stale = {category: count for category, count in status.get("not_ready", {}).items() if category.startswith("stale")}
    summary = build_report(layout, recipe={kind: recipe.as_dict() for kind, recipe in recipes.items()}, stale=stale,
                           note=photoset.report_note or None)
    for line in summary.summary_lines():
        context.log.info(line)
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.path(str(summary.path)),
        "open": dg.MetadataValue.url(summary.path.resolve().as_uri()),
        "images": summary.images,
        "failures": summary.failures,
        "clusters": summary.clusters,
        "bytes": summary.bytes,
        "gallery": dg.MetadataValue.md(_gallery(photoset)),
    })


def _gallery(photoset: PhotosetConfig) -> str:
    """A few thumbnails inline, so the asset page shows pictures (file paths do not load in a browser)."""
    layout = photoset.layout
    cells = []
    clustered = {member for cluster in read_clusters(near_duplicates_path(layout))
                 for member in cluster.members}
    for record in itertools.islice(_records(photoset), GALLERY_SIZE):  # the first few, not the whole file
        path = layout.thumbnail_path(record["image_id"])
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            label = record["image_id"][:10] + (" (duplicate)" if record["image_id"] in clustered else "")
            cells.append(f"![{label}](data:image/webp;base64,{data})")
    return " ".join(cells) or "no thumbnails yet"
