"""The ``approved_links`` stage (the seed's ``sync_approved_photos.py``, rebuilt): every listed photo
gets its raw file and an extension-correct ``approved/<id>.<ext> -> ../raw/<id>`` link.

Downloads stream: items are walked in listing order, a raw already present is linked on the spot,
a missing one is handed to a pool of ``concurrency`` download workers, and each image settles as soon
as its download lands — no barrier between batches, and at most a few downloads queued beyond the
workers. Every download is bounded in time by the downloader, so the stage always ends. Per-item
problems (a failed download, an unknown or unreadable raw, a directory where a link belongs) fail
that image with a reason and never stop the run (the seed crashed on some, B12).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..core.download import Downloader, DownloadJob, DownloadResult
from ..core.filetypes import detect_file_type
from ..core.http import UrlPolicyError
from ..core.layout import DataLayout, InvalidImageId
from ..core.links import LinkError, LinkStatus, ensure_approved_link
from ..core.photolist import PhotoItem
from ..core.validity import raw_fingerprint
from .base import APPROVED_LINKS, Note, Outcome
from .runner import check_cancel


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
    would_download: int = 0  # dry run only
    failure_kinds: Counter[str] = field(default_factory=Counter)  # why downloads failed, by kind
    retry_budget_hit: int = 0  # downloads that failed after using every allowed attempt

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
        lines = ["Summary:", *(f"  {label:<18}{value}" for label, value in rows)]
        if self.would_download:
            lines.append(f"dry run: {self.would_download} download(s) would be made")
        if self.failure_kinds:
            lines.append("  download failures by reason: " + ", ".join(
                f"{kind} {count}" for kind, count in self.failure_kinds.most_common()))
        if self.retry_budget_hit:
            lines.append(f"  retry budget used up by {self.retry_budget_hit} download(s)")
        return lines

    def progress_line(self) -> str:
        return (
            f"progress: processed={self.processed} downloaded={self.downloaded} missing_raw={self.missing_raw} "
            f"download_failed={self.download_failed} unknown_type={self.unknown_type} "
            f"created={self.symlink_created} updated={self.symlink_updated}"
        )


def run_sync_stage(
    items: Sequence[PhotoItem],
    layout: DataLayout,
    downloader: Downloader,
    options: SyncOptions = SyncOptions(),
    *,
    stats: SyncStats | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Outcome | Note]:
    """An outcome per item (in settling order) and log notes; counters accumulate in ``stats``."""
    return _SyncRun(layout, downloader, options, stats if stats is not None else SyncStats(), cancel).run(items)


class _SyncRun:
    def __init__(
        self,
        layout: DataLayout,
        downloader: Downloader,
        options: SyncOptions,
        stats: SyncStats,
        cancel: threading.Event | None,
    ) -> None:
        self.layout = layout
        self.downloader = downloader
        self.options = options
        self.stats = stats
        self.cancel = cancel

    def run(self, items: Sequence[PhotoItem]) -> Iterator[Outcome | Note]:
        options = self.options
        selected = items if options.limit is None else items[: max(0, options.limit)]
        if not options.dry_run:
            self.layout.raw_dir.mkdir(parents=True, exist_ok=True)
            self.layout.approved_dir.mkdir(parents=True, exist_ok=True)
        workers = self.downloader.concurrency
        in_flight: dict[Future[DownloadResult], str] = {}
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
        try:
            for item in selected:
                check_cancel(self.cancel)
                if self._quota_left(len(in_flight)) <= 0:
                    break
                step = self._link_present_or_plan(item)
                if isinstance(step, DownloadJob):
                    in_flight[pool.submit(self.downloader.download, step, self.cancel)] = step.image_id
                    # Keep the workers busy and a few queued, never the whole listing.
                    while len(in_flight) >= 2 * workers:
                        yield from self._settle(in_flight, FIRST_COMPLETED)
                else:
                    yield from self._count(step)
            while in_flight:
                yield from self._settle(in_flight, FIRST_COMPLETED)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _quota_left(self, in_flight: int) -> float:
        """Links still wanted under ``stop_after_links``, counting downloads in flight as links to come,
        so the cut never downloads past it."""
        quota = self.options.stop_after_links
        return float("inf") if quota is None else quota - self.stats.links_changed - in_flight

    def _settle(self, in_flight: dict[Future[DownloadResult], str], mode: str) -> Iterator[Outcome | Note]:
        done: set[Future[DownloadResult]] = set()
        while not done:  # an interrupt is heard while every worker is busy, not after a download ends
            check_cancel(self.cancel)
            done, _ = wait(in_flight, timeout=0.5, return_when=mode)
        for future in done:
            in_flight.pop(future)
            result = future.result()
            if result.ok:
                yield from self._count(self._link(result.image_id, result))
            else:
                yield from self._count(_Settled(result.image_id, "download_failed", f"download failed: {result.error}",
                                                download=result))

    def _link_present_or_plan(self, item: PhotoItem) -> _Settled | DownloadJob:
        """Link an item whose raw file is present; otherwise the download it needs, or why it can have none."""
        try:
            raw = self.layout.raw_path(item.image_id)
        except InvalidImageId as error:
            return _Settled(item.image_id, "missing_raw", str(error))
        if raw.is_symlink():
            # A link could point anywhere; raws are only ever read as regular files inside the root.
            return _Settled(item.image_id, "missing_raw", f"raw/{item.image_id} is a symlink; refusing to follow it")
        if raw.is_file():
            return self._link(item.image_id)
        if item.url is None:
            return _Settled(item.image_id, "missing_raw", "raw file missing and the item has no exportable_url")
        try:
            url = self.downloader.check_url(item.url)
        except UrlPolicyError as error:
            return _Settled(item.image_id, "missing_raw", f"raw file missing and its url is refused: {error}")
        if self.options.dry_run:
            return _Settled(item.image_id, would_download=url)
        return DownloadJob(item.image_id, url, raw)

    def _link(self, image_id: str, download: DownloadResult | None = None) -> _Settled:
        """Detect the raw file's type and place its link."""
        raw = self.layout.raw_path(image_id)
        try:
            ext = detect_file_type(raw)
            stat = os.stat(raw)
        except OSError as error:
            return _Settled(image_id, "unknown_type", f"raw file unreadable: {error}", download=download)
        if ext is None:
            return _Settled(image_id, "unknown_type", "raw file is not a supported image type", download=download)
        try:
            status = ensure_approved_link(self.layout, image_id, ext, dry_run=self.options.dry_run)
        except (LinkError, OSError) as error:
            return _Settled(image_id, "link_error", f"cannot link: {error}", download=download)
        record = {"link": f"approved/{image_id}.{ext}", "ext": ext, **raw_fingerprint(stat)}
        return _Settled(image_id, download=download, link=status, record=record)

    def _count(self, settled: _Settled) -> Iterator[Outcome | Note]:
        stats, options = self.stats, self.options
        stats.processed += 1
        download = settled.download
        if download is not None and download.ok:
            stats.downloaded += 1
            stats.bytes_downloaded += download.nbytes
            if options.verbose:
                yield Note(f"downloaded: {settled.image_id} ({download.nbytes / 1024:.1f} KB)")
        if settled.would_download:
            stats.would_download += 1
            yield Note(f"dry-run: would download {settled.image_id} from {settled.would_download}")
            yield Outcome(APPROVED_LINKS, settled.image_id, "done")
        elif settled.failure is not None:
            if settled.failure != "link_error":
                setattr(stats, settled.failure, getattr(stats, settled.failure) + 1)
            if download is not None and not download.ok:
                stats.failure_kinds[getattr(download, "kind", None) or "other"] += 1
                stats.retry_budget_hit += bool(getattr(download, "retries_exhausted", False))
            yield Note(f"warning: {settled.image_id}: {settled.reason}", "warning")
            yield Outcome(APPROVED_LINKS, settled.image_id, "failed", reason=settled.reason)
        else:
            assert settled.link is not None and settled.record is not None
            setattr(stats, f"symlink_{settled.link}", getattr(stats, f"symlink_{settled.link}") + 1)
            if options.verbose and settled.link != "unchanged":
                link = self.layout.approved_link(settled.image_id, settled.record["ext"])
                yield Note(f"{settled.link}: {link} -> {self.layout.link_target(settled.image_id)}")
            changed = settled.link != "unchanged" or (download is not None and download.ok)
            yield Outcome(APPROVED_LINKS, settled.image_id, "done" if changed else "current", record=settled.record)
        if options.progress_every and stats.processed % options.progress_every == 0:
            yield Note(stats.progress_line())


@dataclass(frozen=True)
class _Settled:
    """What happened to one item."""

    image_id: str
    failure: str | None = None  # the SyncStats counter it adds to (or "link_error")
    reason: str = ""
    download: DownloadResult | None = None  # set when a download was attempted
    link: LinkStatus | None = None  # the link is in place (or would be, in a dry run)
    record: dict | None = None
    would_download: str = ""  # dry run: the url a real run would fetch
