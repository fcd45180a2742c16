"""The visual dataset report: one self-contained HTML file (``reports/dataset_report.html``).

It needs no network: CSS, JavaScript and the plots (inline SVG) are in the file, and the per-image data
is one compact JSON blob that the page's script paginates (one page of each list in the DOM at a time,
images with ``loading="lazy"``), so 60,000 images open quickly. Pictures are *not* inlined (60,000
thumbnails would be hundreds of MB of base64): each ``<img>`` points at ``derived/thumbnails/<id>.webp``
by a path relative to the report, so the report works wherever the data root is, as long as it stays
inside it (or is moved together with ``derived/thumbnails``).

Captions, failure reasons, notes and recipes are untrusted text: the server-side parts are escaped with
:func:`html.escape`, the JSON blob has ``<``, ``>`` and ``&`` escaped so it cannot end its ``<script>``,
and the page's script only ever sets ``textContent``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import time
import urllib.parse
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .artefacts import now_iso
from .atomic import atomic_write_bytes
from .buckets import BUCKET_NAMES
from .failures import Failure, iter_failures
from .layout import DataLayout, is_valid_image_id
from .near_duplicates import Cluster, choose_representative, near_duplicates_path, read_clusters
from .records import is_attention_mask, iter_jsonl, record_image_id

REPORT_NAME = "dataset_report.html"
_TEMPLATE = "report_template.html"
_SLOT = re.compile(r"@@([A-Z]+)@@")
_MAX_BINS = 40
# JSON that cannot close the <script> element holding it (nor open a comment) and is still valid JSON.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def default_report_path(layout: DataLayout) -> Path:
    return layout.reports_dir / REPORT_NAME


@dataclass
class ReportSummary:
    path: Path
    images: int
    thumbnails: int  # of those images, how many have a thumbnail
    failures: int  # failure entries listed
    clusters: int
    bytes: int
    seconds: float

    def summary_lines(self) -> list[str]:
        return [
            f"report: {self.images} images ({self.thumbnails} with thumbnails), {self.failures} failed images, "
            f"{self.clusters} duplicate clusters -> {self.path} ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f}s"
        ]


# --- the data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    image_id: str
    bucket: str
    caption: str
    tokens: int | None  # None: no valid attention mask
    max_length: int
    width: int
    height: int

    @property
    def truncated(self) -> bool:
        return self.tokens is not None and self.tokens >= self.max_length


def _int(value: object) -> int:
    return value if type(value) is int else 0


def _images(records: Iterable[Mapping[str, Any]]) -> list[_Image]:
    """The records' fields the report shows; records without a valid id are left out (the builder never
    writes one, so this only guards against a hand-edited file)."""
    images = []
    for record in records:
        image_id = record_image_id(record)
        if not is_valid_image_id(image_id):
            continue
        mask = record.get("t5_attention_mask")
        valid_mask = is_attention_mask(mask)
        caption = record.get("caption")
        images.append(
            _Image(
                image_id=image_id,
                bucket=str(record.get("aspect_bucket")),
                caption=caption if isinstance(caption, str) else "",
                tokens=sum(mask) if valid_mask else None,
                max_length=_int(record.get("t5_max_length")) or (len(mask) if valid_mask else 0),
                width=_int(record.get("width")),
                height=_int(record.get("height")),
            )
        )
    return images


def _thumbnail_ids(layout: DataLayout) -> set[str]:
    """Ids with a thumbnail file: one directory listing instead of a stat per image."""
    try:
        names = os.listdir(layout.thumbnails_dir)
    except FileNotFoundError:
        return set()
    return {name[:-5] for name in names if name.endswith(".webp") and is_valid_image_id(name[:-5])}


def _bucket_order(images: Sequence[_Image]) -> list[str]:
    """The 7 buckets in their usual order, then any other value found in the records."""
    extra = sorted({image.bucket for image in images} - set(BUCKET_NAMES))
    return [*BUCKET_NAMES, *extra]


def _script_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_SAFE)


def _blob(
    images: Sequence[_Image],
    buckets: Sequence[str],
    failures: Sequence[Failure],
    clusters: Sequence[Cluster],
    thumbnails: Collection[str],
    thumbnails_url: str,
) -> str:
    """The page script's data; rows are arrays, not objects, so 60,000 images carry no repeated keys."""
    bucket_index = {bucket: k for k, bucket in enumerate(buckets)}
    records_by_id = {image.image_id: {"width": image.width, "height": image.height} for image in images}
    return _script_json(
        {
            "thumbnails": thumbnails_url,
            "buckets": list(buckets),
            "images": [
                [
                    image.image_id, bucket_index[image.bucket], image.caption,
                    -1 if image.tokens is None else image.tokens, image.max_length,
                    image.width, image.height, int(image.image_id in thumbnails),
                ]
                for image in images
            ],
            "failures": [
                [f.image_id, f.stage, f.reason, int(f.upstream), f.at, int(f.image_id in thumbnails), list(skipped),
                 [[other.stage, other.reason] for other in also_failed]]
                for f, skipped, also_failed in failures
            ],
            "clusters": [
                [
                    cluster.cluster_id, cluster.kind, cluster.max_similarity, cluster.min_similarity,
                    [[member, int(member in thumbnails)] for member in cluster.members],
                    choose_representative(cluster, records_by_id),
                ]
                for cluster in clusters
            ],
        }
    )


# --- plots ---------------------------------------------------------------------------------------------


def _svg_bars(bars: Sequence[tuple[str, int]], *, label: str, highlight: Collection[int] = ()) -> str:
    """A bar chart as inline SVG: one bar per (label, count), each with a tooltip; ``highlight`` bars in
    the warning colour."""
    width, height, left, bottom, top = 640, 220, 44, 34, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max((count for _, count in bars), default=0) or 1
    step = plot_w / max(len(bars), 1)
    every = max(1, math.ceil(len(bars) / 10))  # at most ~10 x labels, and a highlighted bar always has one
    labelled = {k for k in range(0, len(bars), every) if all(abs(k - h) >= 2 * every for h in highlight)}
    labelled |= set(highlight)
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(label)}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for k, (name, count) in enumerate(bars):
        bar_h = plot_h * count / peak
        x = left + k * step
        css = "bar highlight" if k in highlight else "bar"
        parts.append(
            f'<rect class="{css}" x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{bar_h:.1f}"><title>{html.escape(name)}: {count}</title></rect>'
        )
        if k in labelled:
            last = k == len(bars) - 1 and k > 0  # ends at the bar's right edge, not past the chart's
            anchor, text_x = ("end", x + step) if last else ("middle", x + step / 2)
            parts.append(
                f'<text x="{text_x:.1f}" y="{top + plot_h + 14}" text-anchor="{anchor}">{html.escape(name)}</text>'
            )
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _binned(values: Sequence[int]) -> list[tuple[str, int]]:
    """Integer values in at most ``_MAX_BINS`` equal-width bins, labelled by their range."""
    if not values:
        return []
    low, high = min(values), max(values)
    size = max(1, math.ceil((high - low + 1) / _MAX_BINS))
    counts = Counter((value - low) // size for value in values)
    bins = []
    for k in range((high - low) // size + 1):
        start = low + k * size
        end = min(start + size - 1, high)
        bins.append((str(start) if start == end else f"{start}\u2013{end}", counts.get(k, 0)))
    return bins


def _plot(title: str, svg: str, caption: str) -> str:
    return (
        f'<figure class="plot" data-plot="{html.escape(title)}"><h3>{html.escape(title)}</h3>{svg}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _plots(images: Sequence[_Image], buckets: Sequence[str]) -> str:
    per_bucket = Counter(image.bucket for image in images)
    bucket_bars = [(bucket, per_bucket[bucket]) for bucket in buckets]
    used = sum(1 for _, count in bucket_bars if count)
    plots = [
        _plot("Aspect buckets", _svg_bars(bucket_bars, label="bucket (width x height)"),
              f"{len(images):,} images in {used} buckets.")
    ]

    lengths = [len(image.caption) for image in images]
    summary = ""
    if lengths:
        summary = f"median {statistics.median(lengths):.0f}, mean {statistics.fmean(lengths):.0f} characters."
    plots.append(_plot("Caption length", _svg_bars(_binned(lengths), label="characters"), summary))

    counted = [image for image in images if image.tokens is not None]
    truncated = sum(image.truncated for image in counted)
    max_lengths = sorted({image.max_length for image in counted})
    at_max = f"{max_lengths[0]} (truncated)" if len(max_lengths) == 1 else "max length (truncated)"
    bars = _binned([image.tokens for image in counted if not image.truncated]) + [(at_max, truncated)]
    share = truncated / len(counted) if counted else 0.0
    caption = (
        f"{share:.1%} of captions ({truncated} of {len(counted)}) are truncated at "
        f"t5_max_length {', '.join(map(str, max_lengths)) or '-'} (every mask position is 1)."
    )
    if len(counted) < len(images):
        caption += f" {len(images) - len(counted)} records have no valid attention mask."
    plots.append(_plot("T5 token count", _svg_bars(bars, label="tokens", highlight={len(bars) - 1}), caption))
    return f'<div class="plots">{"".join(plots)}</div>'


# --- the page ------------------------------------------------------------------------------------------


def _number(value: int | str) -> str:
    return f"{value:,}" if isinstance(value, int) else value


def _table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _content(
    title: str,
    note: str | None,
    images: Sequence[_Image],
    buckets: Sequence[str],
    failures: Sequence[Failure],
    clusters: Sequence[Cluster],
    with_thumbnails: int,
    recipe: Mapping[str, Any] | None,
    stale: Mapping[str, int] | None,
) -> str:
    e = html.escape
    failed_images = len(failures)
    duplicates = sum(len(cluster.members) for cluster in clusters)
    truncated = sum(image.truncated for image in images)
    stale_total = sum(stale.values()) if stale else 0
    cards = [
        ("images", len(images)),
        ("with thumbnails", with_thumbnails),
        ("captions truncated", truncated),
        ("failed images", failed_images),
        ("duplicate clusters", len(clusters)),
        ("stale artefacts", stale_total if stale is not None else "-"),
    ]
    by_stage: dict[str, list[int]] = {}
    for f, skipped, also_failed in failures:
        by_stage.setdefault(f.stage, [0, 0])[int(f.upstream)] += 1
        for stage in skipped:
            by_stage.setdefault(stage, [0, 0])[1] += 1
        for other in also_failed:
            by_stage.setdefault(other.stage, [0, 0])[0] += 1
    kinds = Counter(cluster.kind for cluster in clusters)
    recipe_text = json.dumps(recipe, indent=2, sort_keys=True, ensure_ascii=False, default=str) if recipe else ""
    return "".join(
        [
            f"<header><h1>{e(title)}</h1>",
            f'<div class="muted">generated {e(now_iso())}</div>',
            f'<p class="note" id="note">{e(note)}</p>' if note else "",
            '<nav><a href="#plots">plots</a><a href="#images">images</a><a href="#failures">failures</a>'
            '<a href="#duplicates">duplicates</a><a href="#recipe">recipe</a></nav>',
            '<div class="cards" id="summary">',
            "".join(f"<div><b>{e(_number(value))}</b>{e(name)}</div>" for name, value in cards),
            "</div></header><main>",
            f'<section id="plots"><h2>Distributions</h2>{_plots(images, buckets)}</section>',
            '<section id="images"><h2>Images by aspect bucket</h2>',
            '<p><input type="search" id="image-search" placeholder="filter by caption or id"></p>',
            "<noscript><p>The image grid, failures and duplicates need JavaScript.</p></noscript>",
            '<div id="bucket-grids"></div></section>',
            f'<section id="failures"><h2>Failed images ({failed_images:,})</h2>',
            _table(((stage, n[0], n[1]) for stage, n in sorted(by_stage.items())),
                   ("stage", "failed", "skipped (an earlier stage failed)")) if by_stage else "",
            '<div id="failure-list"></div></section>',
            f'<section id="duplicates"><h2>Duplicates: {kinds["exact"]} exact, {kinds["near"]} near '
            f"({duplicates:,} images)</h2>",
            '<p class="muted">Linked by identical raw files or DINOv3 cosine similarity at or above the threshold. '
            "The outlined image is the representative kept when near-duplicates are excluded.</p>",
            '<div id="cluster-list"></div></section>',
            '<section id="recipe"><h2>Recipe and staleness</h2>',
            f"<pre>{e(recipe_text)}</pre>" if recipe else '<p class="muted">No recipe given.</p>',
            _table(sorted(stale.items()), ("artefact", "stale")) if stale else
            f'<p class="muted">{"No stale artefacts." if stale is not None else "Staleness not given."}</p>',
            "</section></main>",
        ]
    )


def _by_image(failures: Iterable[Failure]) -> list[tuple[Failure, tuple[str, ...], tuple[Failure, ...]]]:
    """One row per image: the failure that stopped it (the earliest direct one; a skip when the ledger
    holds no direct failure), the stages skipped because of it, in the order they ran, and the other
    stages it failed on their own (a failed caption does not stop the VAE, which can fail too). Images
    that failed directly first, then by stage and id."""
    by_image: dict[str, list[Failure]] = {}
    for failure in failures:
        by_image.setdefault(failure.image_id, []).append(failure)
    rows = []
    for entries in by_image.values():
        entries.sort(key=lambda f: f.at or "")
        cause = next((f for f in entries if not f.upstream), entries[0])
        rows.append((cause, tuple(f.stage for f in entries if f.upstream and f is not cause),
                     tuple(f for f in entries if not f.upstream and f is not cause)))
    return sorted(rows, key=lambda row: (row[0].upstream, row[0].stage, row[0].image_id))


def render_report(
    layout: DataLayout,
    records: Iterable[Mapping[str, Any]],
    *,
    failures: Iterable[Failure] = (),
    clusters: Iterable[Cluster] = (),
    recipe: Mapping[str, Any] | None = None,
    stale: Mapping[str, int] | None = None,
    note: str | None = None,
    output: Path | None = None,
    title: str | None = None,
) -> ReportSummary:
    """Write the report for the Stage-2 ``records`` atomically to ``output`` (default
    :func:`default_report_path`) and return what it holds.

    ``failures`` are the failure ledger's entries, ``clusters`` the duplicate clusters, ``recipe`` the
    recipe in force (shown as JSON), ``stale`` the number of stale artefacts per kind, ``note`` a line
    shown at the top (e.g. "captions come from random-weight demo models"). Thumbnails are taken from
    ``layout.thumbnails_dir`` as they are; missing ones show a placeholder.
    """
    started = time.monotonic()
    output = Path(output) if output is not None else default_report_path(layout)
    images = _images(records)
    buckets = _bucket_order(images)
    failures = _by_image(failures)
    clusters = list(clusters)
    thumbnails = _thumbnail_ids(layout)
    with_thumbnails = sum(image.image_id in thumbnails for image in images)
    title = title or f"Dataset report: {layout.root.name}"
    relative = os.path.relpath(layout.thumbnails_dir, output.parent).replace(os.sep, "/")
    slots = {
        "TITLE": html.escape(title),
        "CONTENT": _content(title, note, images, buckets, failures, clusters, with_thumbnails, recipe, stale),
        "DATA": _blob(images, buckets, failures, clusters, thumbnails, urllib.parse.quote(relative) + "/"),
    }
    template = resources.files(__package__).joinpath(_TEMPLATE).read_text(encoding="utf-8")
    # One pass over the template: text put into a slot is never scanned for slots itself.
    page = _SLOT.sub(lambda match: slots[match.group(1)], template)
    # "replace": a caption read with surrogateescape (bytes that were not UTF-8) must not stop the report.
    data = page.encode("utf-8", errors="replace")
    atomic_write_bytes(output, data)
    return ReportSummary(
        path=output,
        images=len(images),
        thumbnails=with_thumbnails,
        failures=len(failures),
        clusters=len(clusters),
        bytes=len(data),
        seconds=time.monotonic() - started,
    )


def build_report(
    layout: DataLayout,
    recipe: Mapping[str, Any] | None = None,
    stale: Mapping[str, int] | None = None,
    note: str | None = None,
    *,
    output: Path | None = None,
) -> ReportSummary:
    """:func:`render_report` over what the layout holds: the dataset JSONL (malformed lines skipped), the
    failure ledger and the duplicate clusters (each missing one counts as empty)."""
    records = (
        [record for _, record, _ in iter_jsonl(layout.dataset_jsonl) if record is not None]
        if layout.dataset_jsonl.is_file()
        else []
    )
    return render_report(
        layout,
        records,
        failures=iter_failures(layout),
        clusters=read_clusters(near_duplicates_path(layout)),
        recipe=recipe,
        stale=stale,
        note=note,
        output=output,
    )
