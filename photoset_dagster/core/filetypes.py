"""Image type detection from magic bytes: the extension an ``approved/`` link gets.

Only types this Pillow can decode are reported, so everything linked can be read downstream. Every
name returned is one of ``core.links.LINK_EXTENSIONS``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import features

# Enough for every signature below, including an AVIF ftyp box's first compatible brands.
HEAD_BYTES = 32

# Pillow's AVIF codec is optional at build time; without it an .avif link would be undecodable.
AVIF_SUPPORTED: bool = bool(features.check("avif"))

SUPPORTED_TYPES: tuple[str, ...] = ("jpg", "png", "gif", "webp", "bmp", "tiff") + (("avif",) if AVIF_SUPPORTED else ())

# Sizes of the DIB headers Windows and OS/2 bitmaps use (BITMAPCOREHEADER .. BITMAPV5HEADER).
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (any text starting "BM..."): also require a known DIB header size.
    return head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES


def _is_avif(head: bytes) -> bool:
    """An ISO-BMFF ``ftyp`` box whose major or compatible brands name AVIF (not HEIC, which shares mif1)."""
    if head[4:8] != b"ftyp":
        return False
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    compatible = [head[i : i + 4] for i in range(16, box_end - 3, 4)]
    return any(brand in _AVIF_BRANDS for brand in (head[8:12], *compatible))


def detect_type(head: bytes) -> str | None:
    """The image type of a file starting with ``head`` (its first :data:`HEAD_BYTES` bytes), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _is_bmp(head):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if AVIF_SUPPORTED and _is_avif(head):
        return "avif"
    return None


def detect_file_type(path: Path) -> str | None:
    """:func:`detect_type` of a file; an unreadable file raises OSError for the caller to count."""
    with open(path, "rb") as handle:
        return detect_type(handle.read(HEAD_BYTES))
