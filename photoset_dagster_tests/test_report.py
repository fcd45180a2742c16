"""The dataset report: its content and escaping, its speed and size at 60,000 images, and the page itself
in headless Chromium (Debian's /usr/bin/chromium driven by Playwright, as in test_web_ui.py).

The browser tests save test-artifacts/dataset-report.png (git-ignored) and are skipped only when
Chromium or Playwright is missing (`apt-get install chromium`; ./tasks.sh test installs it as root).
"""

from __future__ import annotations

import html.parser
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from photoset_dagster.core.atomic import save_npy_atomic
from photoset_dagster.core.buckets import BUCKET_NAMES, parse_bucket
from photoset_dagster.core.failures import Failure, record_failure
from photoset_dagster.core.layout import DataLayout
from photoset_dagster.core.near_duplicates import Cluster, find_near_duplicates, near_duplicates_path, write_clusters
from photoset_dagster.core.records import write_jsonl_atomic
from photoset_dagster.core.report import build_report, default_report_path, render_report
from photoset_dagster.core.thumbnails import make_thumbnails
from photoset_dagster_tests.test_web_ui import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

T5_MAX = 77
INJECTION = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
SCALE_IMAGES = 60_000
CAPTION_WORDS = (
    "a woman in a red dress stands on a stone pier weight on her left leg overcast daylight soft light harbour "
    "fishing boats low hills full body framing camera at chest height three quarter angle"
).split()


def stage2_record(image_id: str, caption: str, *, bucket: str = "1024x1024", tokens: int = 12,
                  raw_sha256: str | None = None) -> dict:
    width, height = parse_bucket(bucket)
    return {
        "image_id": image_id,
        "image_path": f"data/approved/{image_id}.jpg",
        "caption": caption,
        "t5_attention_mask": [1] * tokens + [0] * (T5_MAX - tokens),
        "height": height,
        "width": width,
        "aspect_bucket": bucket,
        "format_version": 2,
        "raw_sha256": raw_sha256 or f"sha-{image_id}",
        "recipes": {"captions": "c1", "dinov3": "d1", "vae_latents": "v1", "t5_hidden": "t1"},
        "t5_max_length": T5_MAX,
    }


class _Elements(html.parser.HTMLParser):
    """Element ids, tag counts and the text of each <script> (the stdlib parser, as a browser tokenises)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: dict[str, str] = {}
        self.tags: dict[str, int] = {}
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if "id" in attributes:
            self.ids[attributes["id"]] = tag
        if tag == "script":
            self._script = attributes
            self.scripts.append((attributes, ""))

    def handle_data(self, data):
        if self._script is not None:
            attributes, text = self.scripts[-1]
            self.scripts[-1] = (attributes, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


def parse(path: Path) -> _Elements:
    parser = _Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def report_data(parsed: _Elements) -> dict:
    (text,) = [text for attributes, text in parsed.scripts if attributes.get("id") == "report-data"]
    return json.loads(text)


# --- content ---------------------------------------------------------------------------------------


def test_the_report_has_every_section_and_escapes_untrusted_text(layout: DataLayout):
    records = [
        stage2_record("a", INJECTION, tokens=T5_MAX),  # truncated
        stage2_record("b", "a calm <b>bold</b> & \"quoted\" harbour", bucket="832x1216"),
        stage2_record("c", "plain", bucket="832x1216", tokens=30),
        stage2_record("d", "four", bucket="1344x704", tokens=T5_MAX),  # truncated
    ]
    failures = [
        Failure("broken", "image_facts", "cannot decode broken: <script>alert(1)</script>", at="2026-01-01T00:00:00Z"),
        Failure("broken", "captions", "image_facts failed", upstream=True),
        Failure("c", "captions", "caption backend returned an empty caption", at="2026-01-01T00:00:01Z"),
        Failure("c", "vae_latents", "CUDA out of memory", at="2026-01-01T00:00:02Z"),  # independent of captions
    ]
    cluster = Cluster("dup-1", "near", ("a", "b"), 0.99, 0.97, (), (("a", "b", 0.99),), 1, 0.95)
    summary = render_report(
        layout, records, failures=failures, clusters=[cluster],
        recipe={"captions": {"prompt": "</pre><script>x</script>"}}, stale={"captions": 3, "t5_hidden": 1},
        note="captions come from <random-weight> demo models",
    )
    path = default_report_path(layout)
    assert summary.path == path == layout.reports_dir / "dataset_report.html"
    assert (summary.images, summary.failures, summary.clusters, summary.bytes) == (4, 2, 1, path.stat().st_size)
    text = path.read_text(encoding="utf-8")
    parsed = parse(path)

    for section in ("summary", "note", "plots", "images", "bucket-grids", "failures", "failure-list",
                    "duplicates", "cluster-list", "recipe", "report-data", "image-search"):
        assert section in parsed.ids, section
    assert parsed.tags["svg"] == 3 and parsed.tags["rect"] > 10
    # Two scripts only (the data blob and the page's own code): no caption, reason or recipe became one.
    assert len(parsed.scripts) == 2 and parsed.tags["script"] == 2
    for markup in ("<img src=x", "<script>window", "<b>bold", "<script>alert", "<random-weight>", "</pre><script>"):
        assert markup not in text, markup
    assert "&lt;random-weight&gt;" in text and "&lt;/pre&gt;&lt;script&gt;" in text
    assert "http://" not in text and "https://" not in text  # nothing from the network

    data = report_data(parsed)  # the blob round-trips every string exactly
    assert data["images"][0][2] == INJECTION
    # One row per image: where it failed and why, the stages skipped because of it, the others it failed.
    assert [row[0] for row in data["failures"]] == ["c", "broken"]
    assert data["failures"][1][1:4] == ["image_facts", "cannot decode broken: <script>alert(1)</script>", 0]
    assert data["failures"][1][6] == ["captions"] and data["failures"][1][7] == []
    assert data["failures"][0][1:3] == ["captions", "caption backend returned an empty caption"]
    assert data["failures"][0][7] == [["vae_latents", "CUDA out of memory"]]
    assert data["clusters"][0][0] == "dup-1" and [m[0] for m in data["clusters"][0][4]] == ["a", "b"]
    assert data["thumbnails"] == "../derived/thumbnails/"
    assert "50.0% of captions (2 of 4) are truncated at t5_max_length 77" in text


def test_thumbnails_are_referenced_relative_to_the_report(layout: DataLayout, tmp_path):
    layout.thumbnails_dir.mkdir(parents=True)
    (layout.thumbnails_dir / "a.webp").write_bytes(b"webp")
    elsewhere = layout.root / "exports" / "deep" / "report.html"
    render_report(layout, [stage2_record("a", "x"), stage2_record("b", "y")], output=elsewhere)
    data = report_data(parse(elsewhere))
    assert data["thumbnails"] == "../../derived/thumbnails/"
    assert [row[7] for row in data["images"]] == [1, 0]  # a has a thumbnail, b does not


def test_captions_that_are_not_utf8_do_not_stop_the_report(layout: DataLayout):
    # iter_jsonl reads with surrogateescape: bytes that were not UTF-8 arrive as lone surrogates.
    summary = render_report(layout, [stage2_record("a", "caf\udce9 noir"), {"no": "id"}])
    assert summary.images == 1
    assert report_data(parse(summary.path))["images"][0][2] == "caf? noir"


def test_build_report_reads_the_layout(layout: DataLayout):
    write_jsonl_atomic(layout.dataset_jsonl, [stage2_record("a", "one"), stage2_record("b", "two")])
    with open(layout.dataset_jsonl, "a") as handle:
        handle.write("not json\n")
    record_failure(layout, Failure("broken", "image_facts", "cannot decode broken"))
    exact = Cluster("dup-1", "exact", ("a", "b"), 1.0, 1.0, (("a", "b"),), (), 0, 0.95)
    write_clusters(near_duplicates_path(layout), [exact])
    summary = build_report(layout, {"dinov3": {"model": "tiny"}}, {"dinov3": 0}, "a note")
    assert (summary.images, summary.failures, summary.clusters) == (2, 1, 1)
    assert summary.summary_lines()[0].startswith("report: 2 images (0 with thumbnails), 1 failed images, 1 duplicate")
    data = report_data(parse(summary.path))
    assert data["failures"][0][:3] == ["broken", "image_facts", "cannot decode broken"]


def test_build_report_of_an_empty_data_root(layout: DataLayout):
    summary = build_report(layout)
    assert (summary.images, summary.failures, summary.clusters) == (0, 0, 0)
    parsed = parse(summary.path)
    assert "plots" in parsed.ids and report_data(parsed)["images"] == []


# --- scale ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_report(tmp_path_factory) -> tuple[DataLayout, object, int]:
    """60,000 synthetic records with seed-length captions (no thumbnails), 600 failures, 300 clusters."""
    layout = DataLayout(tmp_path_factory.mktemp("large") / "data")
    rng = random.Random(0)
    records = [
        stage2_record(f"img{k:06d}", " ".join(rng.choices(CAPTION_WORDS, k=rng.randint(40, 80))),
                      bucket=rng.choice(BUCKET_NAMES), tokens=rng.randint(20, T5_MAX))
        for k in range(SCALE_IMAGES)
    ]
    failures = [Failure(f"bad{k:04d}", "image_facts", f"cannot decode bad{k:04d}: truncated") for k in range(600)]
    clusters = [
        Cluster(f"dup-{k}", "near", (f"img{2 * k:06d}", f"img{2 * k + 1:06d}"), 0.99, 0.99, (), (), 1, 0.95)
        for k in range(300)
    ]
    caption_bytes = sum(len(record["caption"].encode()) for record in records)
    summary = render_report(layout, records, failures=failures, clusters=clusters, note="synthetic")
    return layout, summary, caption_bytes


def test_the_report_of_60000_images_is_compact(large_report):
    _, summary, caption_bytes = large_report
    assert summary.images == SCALE_IMAGES
    # The captions themselves, plus a small fixed cost per image (no per-image markup, no repeated keys).
    overhead = summary.bytes - caption_bytes
    assert overhead < 120 * SCALE_IMAGES, f"{overhead / SCALE_IMAGES:.0f} bytes per image beyond the caption"
    assert summary.bytes < 60e6


# --- in a real browser --------------------------------------------------------------------------------------


@pytest.fixture
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium, or ./tasks.sh test as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A picture with some structure (gradient, shapes) so thumbnails and embeddings differ visibly."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        r = rng.randrange(20, max(size) // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def small_dataset(layout: DataLayout) -> dict[str, str]:
    """Real images in three buckets, a near-duplicate pair (one photo saved at two JPEG qualities), a
    failed image with a corrupt raw and a failed one that has a thumbnail; returns id -> caption."""
    rng = np.random.default_rng(3)
    sizes = {"1024x1024": (512, 512), "832x1216": (416, 608), "1216x832": (608, 416)}
    captions = {}
    records = []
    for k, bucket in enumerate([*sizes, *sizes, "1024x1024"]):
        image_id = f"photo{k}"
        layout.raw_path(image_id).write_bytes(jpeg(photo(sizes[bucket], k)))
        captions[image_id] = f"photo {k}: a harbour scene with {k + 2} fishing boats"
        records.append(stage2_record(image_id, captions[image_id], bucket=bucket, tokens=10 + 9 * k))
    original = photo((512, 512), 99)
    for image_id, quality in (("twin-a", 92), ("twin-b", 60)):
        layout.raw_path(image_id).write_bytes(jpeg(original, quality))
        captions[image_id] = f"{image_id}: the same lighthouse twice"
        records.append(stage2_record(image_id, captions[image_id]))
    captions["photo6"] = INJECTION
    records[6].update(caption=INJECTION, t5_attention_mask=[1] * T5_MAX)  # and truncated
    layout.raw_path("broken").write_bytes(jpeg(original)[:300])
    layout.raw_path("uncaptioned").write_bytes(jpeg(photo((400, 300), 7)))

    thumbnails = make_thumbnails(layout, [*captions, "broken", "uncaptioned"])
    assert thumbnails.ids("failed") == ["broken"]
    record_failure(layout, Failure("broken", "image_facts", thumbnails.outcomes["broken"].reason))
    record_failure(layout, Failure("uncaptioned", "captions", "caption backend returned an empty caption",
                                   at="2026-01-01T00:00:01Z"))
    record_failure(layout, Failure("uncaptioned", "vae_latents", "CUDA out of memory", at="2026-01-01T00:00:02Z"))
    write_jsonl_atomic(layout.dataset_jsonl, records)

    base = rng.standard_normal(64)
    for image_id in captions:
        vector = base + 0.05 * rng.standard_normal(64) if image_id.startswith("twin") else rng.standard_normal(64)
        save_npy_atomic(layout.npy_path("dinov3", image_id), vector.astype(np.float32))
    (cluster,) = find_near_duplicates(layout, records).clusters
    assert cluster.members == ("twin-a", "twin-b")
    return captions


def open_report(browser, path: Path, viewport: dict):
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page, errors


def loaded_images(page, selector: str) -> list[list]:
    """[alt, naturalWidth] of the <img> under ``selector``, once each is scrolled into view and done."""
    images = page.locator(f"{selector} img")
    for k in range(images.count()):
        images.nth(k).scroll_into_view_if_needed()
    page.wait_for_function(
        "s => Array.from(document.querySelectorAll(s + ' img')).every(i => i.complete)", arg=selector, timeout=15_000
    )
    return page.evaluate("s => Array.from(document.querySelectorAll(s + ' img')).map(i => [i.alt, i.naturalWidth])",
                         selector)


def test_the_report_in_chromium(chromium, layout: DataLayout):
    captions = small_dataset(layout)
    summary = build_report(
        layout, recipe={"captions": {"backend": "demo"}}, stale={"captions": 2, "vae_latents": 0},
        note="captions come from random-weight demo models",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dataset-report.png"
    screenshot.unlink(missing_ok=True)
    page, errors = open_report(chromium, summary.path, {"width": 1400, "height": 1000})
    try:
        # Every image of the grid, in its bucket, with a thumbnail that really decoded.
        grid = loaded_images(page, "#bucket-grids")
        assert sorted(alt for alt, _ in grid) == sorted(captions)
        assert all(width > 0 for _, width in grid), grid
        assert page.locator("#bucket-grids section.bucket").count() == 3
        assert page.locator("section[data-bucket='1024x1024'] figure.card").count() == 5
        card = page.locator("figure.card", has_text="photo 1: a harbour scene")
        assert "photo 1: a harbour scene with 3 fishing boats" in card.get_attribute("title")

        # The injected caption is shown as text and ran nothing.
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("figure.card .caption", has_text="window.__pwned = 1").count() == 1

        # Plots: three inline SVG charts with bars; the truncated bar is highlighted.
        assert page.locator("#plots figure.plot svg").count() == 3
        assert page.locator("#plots svg rect.bar").count() > 10
        assert page.locator("#plots svg rect.highlight").count() == 1
        assert "are truncated at t5_max_length 77" in page.locator("#plots").inner_text()

        # Failures: the corrupt image with its stage and reason; the other with its thumbnail.
        broken = page.locator("#failure-list tr[data-image-id='broken']")
        assert "image_facts" in broken.inner_text() and "cannot decode" in broken.inner_text()
        assert broken.locator(".thumb.none").count() == 1
        assert loaded_images(page, "#failure-list tr[data-image-id='uncaptioned']")[0][1] > 0
        uncaptioned = page.locator("#failure-list tr[data-image-id='uncaptioned']").inner_text()
        assert "empty caption" in uncaptioned and "also failed at vae_latents: CUDA out of memory" in uncaptioned

        # The near-duplicate pair side by side, both thumbnails loaded, one marked as the representative.
        cluster = page.locator("#cluster-list .cluster")
        assert cluster.count() == 1 and "near" in cluster.inner_text()
        assert sorted(loaded_images(page, "#cluster-list .cluster")) == [["twin-a", 256], ["twin-b", 256]]
        assert cluster.locator("figure.representative").count() == 1

        # Recipe, staleness and the note.
        assert '"backend": "demo"' in page.locator("#recipe pre").inner_text()
        assert "captions come from random-weight demo models" in page.locator("#note").inner_text()

        # The filter narrows the grid.
        page.fill("#image-search", "lighthouse")
        page.wait_for_function("() => document.querySelectorAll('#bucket-grids figure.card').length === 2")

        page.fill("#image-search", "")
        page.wait_for_function("() => document.querySelectorAll('#bucket-grids figure.card').length === 9")
        page.screenshot(path=str(screenshot), full_page=True)
        assert not errors, errors
    finally:
        page.close()
    assert screenshot.stat().st_size > 10_000


def test_the_report_of_60000_images_stays_usable_in_chromium(chromium, large_report):
    _, summary, _ = large_report
    page, errors = open_report(chromium, summary.path, {"width": 1400, "height": 1000})
    try:
        # One page per bucket in the DOM, not 60,000 cards (bench/report.py times the render).
        assert page.locator("#bucket-grids section.bucket").count() == len(BUCKET_NAMES)
        assert page.locator("figure.card").count() == 60 * len(BUCKET_NAMES)
        section = page.locator("section[data-bucket='1024x1024']")
        section.get_by_role("button", name="next").click()
        assert "page 2 of" in section.locator(".pager").inner_text()
        assert page.locator("#failure-list tbody tr").count() == 50
        assert page.locator("#cluster-list .cluster").count() == 20
        assert not errors, errors
    finally:
        page.close()
