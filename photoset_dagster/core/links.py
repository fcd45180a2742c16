"""The extension-correct symlink view: ``approved/<id>.<ext> -> ../raw/<id>``.

One link per id: when a raw file's type changes, the old extension's link is replaced rather than
left beside the new one (the seed duplicated ids that way). Nothing outside the data root is
written or followed: links are only ever read with ``readlink`` and compared lexically.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

from .layout import DataLayout, is_valid_image_id, validate_image_id

LinkStatus = Literal["created", "updated", "unchanged"]

# Every extension a link may carry: what filetypes detects, plus aliases older tools wrote.
LINK_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff", "avif", "heic")


class LinkError(RuntimeError):
    """A link cannot be placed (e.g. a directory occupies its name)."""


def scan_approved_links(layout: DataLayout) -> dict[str, list[str]]:
    """``{image_id: [ext, ...]}`` for every symlink in approved/ named ``<valid id>.<ext>``."""
    found: dict[str, list[str]] = {}
    if not layout.approved_dir.is_dir():
        return found
    for entry in os.scandir(layout.approved_dir):
        if not entry.is_symlink():
            continue
        stem, dot, ext = entry.name.partition(".")
        if dot and ext and "." not in ext and is_valid_image_id(stem):
            found.setdefault(stem, []).append(ext)
    return found


def _points_at(link: Path, target: str) -> bool:
    """Lexical comparison, like the seed: never resolves the link's target on disk."""
    try:
        current = os.readlink(link)
    except OSError:
        return False
    return os.path.normpath(os.path.join(link.parent, current)) == os.path.normpath(os.path.join(link.parent, target))


def ensure_approved_link(layout: DataLayout, image_id: str, ext: str, *, dry_run: bool = False) -> LinkStatus:
    """Make ``approved/<id>.<ext>`` point at ``../raw/<id>``, replacing links of other extensions."""
    link = layout.approved_link(image_id, ext)
    target = layout.link_target(image_id)
    others = [e for e in scan_approved_links_for(layout, image_id) if e != ext]

    if link.is_dir() and not link.is_symlink():
        raise LinkError(f"a directory occupies {link}; remove it to let the link be created")
    if link.is_symlink() and _points_at(link, target) and not others:
        return "unchanged"

    status: LinkStatus = "updated" if (os.path.lexists(link) or others) else "created"
    if dry_run:
        return status
    if not (os.path.lexists(link) and _points_at(link, target)):
        layout.approved_dir.mkdir(parents=True, exist_ok=True)
        # A new link under a temporary name, then rename over the old one: a crash never leaves no link.
        temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.symlink(target, temporary)
        os.replace(temporary, link)
    for other in others:
        os.unlink(layout.approved_link(image_id, other))
    return status


def scan_approved_links_for(layout: DataLayout, image_id: str) -> list[str]:
    """Extensions of the symlinks ``approved/<image_id>.<ext>`` (normally zero or one).

    Probes the known extensions instead of listing the folder, so per-id calls stay O(1) at 60k ids.
    """
    stem = os.path.join(layout.approved_dir, validate_image_id(image_id))
    return [ext for ext in LINK_EXTENSIONS if os.path.islink(f"{stem}.{ext}")]


def remove_approved_links(layout: DataLayout, image_id: str, *, dry_run: bool = False) -> list[Path]:
    """Remove every ``approved/<image_id>.*`` symlink; returns the paths (that would be) removed."""
    removed = [layout.approved_link(image_id, ext) for ext in scan_approved_links_for(layout, image_id)]
    if not dry_run:
        for path in removed:
            os.unlink(path)
    return removed
