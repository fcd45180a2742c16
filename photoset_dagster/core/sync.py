"""The sync stage (the seed's ``sync_approved_photos.py``, rebuilt): make sure every listed photo has
its raw file and an extension-correct ``approved/<id>.<ext> -> ../raw/<id>`` link.

Items are handled in chunks. Within a chunk, raws already present are linked first, then the
missing ones are downloaded concurrently and each is linked as soon as it lands (while the others
are still in flight); finally the chunk's outcomes are counted in listing order, so counters,
progress lines and the ``stop_after_links`` cut read exactly as in the sequential seed. Per-item
problems (a failed download, an unreadable or unknown raw, a directory where a link belongs) are
recorded in ``SyncStats.failures`` and never stop the run (the seed crashed on some, B12).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .download import Downloader, DownloadJob, DownloadResult
from .filetypes import detect_file_type
from .http import UrlPolicyError
from .layout import DataLayout, InvalidImageId
from .links import LinkError, LinkStatus, ensure_approved_link
from .photolist import PhotoItem

# Items per download batch: large enough to keep every worker busy, small enough that links
# appear (and an interrupted run has made progress) long before a 60k-item listing is done.
_CHUNK_ITEMS = 512


@dataclass
class SyncOptions:
    dry_run: bool = False
    limit: int | None = None  # process at most this many items
    stop_after_links: int | None = None  # stop once created + updated >= N
    progress_every: int = 1000  # 0 disables progress lines
    verbose: bool = False  # also log every download and every created/updated link


@dataclass
class SyncStats:
    processed: int = 0
    downloaded: int = 0
    download_failed: int = 0
    missing_raw: int = 0
    unknown_type: int = 0
    symlink_created: int = 0
    symlink_updated: int = 0
    symlink_unchanged: int = 0
    bytes_downloaded: int = 0
    # image_id -> ext of every link in place (in dry-run: that would be in place)
    linked: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # image_id -> why it has no link

    @property
    def links_changed(self) -> int:
        return self.symlink_created + self.symlink_updated

    def summary_lines(self) -> list[str]:
        rows = [
            ("processed:", self.processed),
            ("downloaded:", self.downloaded),
            ("download failed:", self.download_failed),
            ("missing raw:", self.missing_raw),
            ("unknown type:", self.unknown_type),
            ("symlink created:", self.symlink_created),
            ("symlink updated:", self.symlink_updated),
            ("symlink unchanged:", self.symlink_unchanged),
        ]
        return ["Summary:", *(f"  {label:<18}{value}" for label, value in rows)]

    def progress_line(self) -> str:
        return (
            f"progress: processed={self.processed} downloaded={self.downloaded} missing_raw={self.missing_raw} "
            f"download_failed={self.download_failed} unknown_type={self.unknown_type} "
            f"created={self.symlink_created} updated={self.symlink_updated}"
        )


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# Why an item has no link; except "link_error" (the seed crashed instead, B12), each names the
# SyncStats counter it adds to.
_FailureKind = Literal["missing_raw", "download_failed", "unknown_type", "link_error"]


@dataclass(frozen=True)
class _Outcome:
    """What happened to one item; counted later, in listing order."""

    download: DownloadResult | None = None  # set when a download was attempted
    failure: tuple[_FailureKind, str] | None = None  # (kind, reason)
    link: tuple[LinkStatus, str] | None = None  # (status, ext): the link is in place (or would be, in dry-run)


# Dry-run, raw missing but fetchable: a real run would download it; the seed counts nothing for that.
_WOULD_DOWNLOAD = _Outcome()


def sync_images(
    items: Sequence[PhotoItem],
    layout: DataLayout,
    downloader: Downloader,
    options: SyncOptions = SyncOptions(),
    *,
    log: Callable[[str], None] = _log_to_stderr,
) -> SyncStats:
    """Download missing raws and place links for ``items`` (unique ids, in listing order); returns the counters."""
    return _SyncRun(layout, downloader, options, log).run(items)


class _SyncRun:
    def __init__(
        self, layout: DataLayout, downloader: Downloader, options: SyncOptions, log: Callable[[str], None]
    ) -> None:
        self.layout = layout
        self.downloader = downloader
        self.options = options
        self.log = log
        self.stats = SyncStats()

    def run(self, items: Sequence[PhotoItem]) -> SyncStats:
        options = self.options
        selected = items if options.limit is None else items[: max(0, options.limit)]
        if not options.dry_run:
            self.layout.raw_dir.mkdir(parents=True, exist_ok=True)
            self.layout.approved_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        while start < len(selected) and not self._link_quota_reached():
            size = _CHUNK_ITEMS
            if options.stop_after_links is not None:
                # Each item adds at most one link, so a chunk no longer than the links still wanted
                # never downloads past the cut, and the quota can only be reached at a chunk's end.
                size = min(size, options.stop_after_links - self.stats.links_changed)
            chunk = selected[start : start + size]
            start += size
            outcomes = self._handle(chunk)
            for item in chunk:
                self._count(item.image_id, outcomes[item.image_id])
                if options.progress_every and self.stats.processed % options.progress_every == 0:
                    self.log(self.stats.progress_line())
        return self.stats

    def _link_quota_reached(self) -> bool:
        quota = self.options.stop_after_links
        return quota is not None and self.stats.links_changed >= quota

    def _handle(self, chunk: Sequence[PhotoItem]) -> dict[str, _Outcome]:
        """Do every item's work (downloads concurrently); returns the outcomes by id."""
        outcomes: dict[str, _Outcome] = {}
        jobs: list[DownloadJob] = []
        for item in chunk:
            step = self._link_present_or_plan(item)
            if isinstance(step, DownloadJob):
                jobs.append(step)
            else:
                outcomes[item.image_id] = step
        if jobs:
            self.log(f"downloading {len(jobs)} missing raw file(s), {self.downloader.concurrency} at a time")

            def link_downloaded(result: DownloadResult) -> None:  # runs on this thread, as each lands
                if result.ok:
                    outcomes[result.image_id] = self._link(result.image_id, result)
                else:
                    failure: tuple[_FailureKind, str] = ("download_failed", f"download failed: {result.error}")
                    outcomes[result.image_id] = _Outcome(result, failure)

            self.downloader.download_many(jobs, on_result=link_downloaded)
        return outcomes

    def _link_present_or_plan(self, item: PhotoItem) -> _Outcome | DownloadJob:
        """Link an item whose raw file is present; otherwise the download it needs, or why it can have none."""
        try:
            raw = self.layout.raw_path(item.image_id)
        except InvalidImageId as error:
            return _Outcome(failure=("missing_raw", str(error)))
        if raw.is_symlink():
            # A link could point anywhere; raws are only ever read as regular files inside the root.
            return _Outcome(failure=("missing_raw", f"raw/{item.image_id} is a symlink; refusing to follow it"))
        if raw.is_file():
            return self._link(item.image_id)
        if item.url is None:
            return _Outcome(failure=("missing_raw", "raw file missing and the item has no exportable_url"))
        try:
            url = self.downloader.check_url(item.url)
        except UrlPolicyError as error:
            return _Outcome(failure=("missing_raw", f"raw file missing and its url is refused: {error}"))
        if self.options.dry_run:
            self.log(f"dry-run: would download {item.image_id} from {url}")
            return _WOULD_DOWNLOAD
        return DownloadJob(item.image_id, url, raw)

    def _link(self, image_id: str, download: DownloadResult | None = None) -> _Outcome:
        """Detect the raw file's type and place its link."""
        try:
            ext = detect_file_type(self.layout.raw_path(image_id))
        except OSError as error:
            return _Outcome(download, ("unknown_type", f"raw file unreadable: {error}"))
        if ext is None:
            return _Outcome(download, ("unknown_type", "raw file is not a supported image type"))
        try:
            status = ensure_approved_link(self.layout, image_id, ext, dry_run=self.options.dry_run)
        except (LinkError, OSError) as error:
            return _Outcome(download, ("link_error", f"cannot link: {error}"))
        return _Outcome(download, link=(status, ext))

    def _count(self, image_id: str, outcome: _Outcome) -> None:
        stats, verbose = self.stats, self.options.verbose
        stats.processed += 1
        if outcome.download is not None and outcome.download.ok:
            stats.downloaded += 1
            stats.bytes_downloaded += outcome.download.nbytes
            if verbose:
                self.log(f"downloaded: {image_id} ({outcome.download.nbytes / 1024:.1f} KB)")
        if outcome.failure is not None:
            kind, reason = outcome.failure
            if kind != "link_error":
                _increment(stats, kind)
            stats.failures[image_id] = reason
            self.log(f"warning: {image_id}: {reason}")
        if outcome.link is not None:
            status, ext = outcome.link
            _increment(stats, f"symlink_{status}")
            stats.linked[image_id] = ext
            if verbose and status != "unchanged":
                self.log(f"{status}: {self.layout.approved_link(image_id, ext)} -> {self.layout.link_target(image_id)}")


def _increment(stats: SyncStats, counter: str) -> None:
    setattr(stats, counter, getattr(stats, counter) + 1)
