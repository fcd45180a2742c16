"""Safe image decoding: every raw file becomes an upright 8-bit sRGB image, or an ImageDecodeError.

The seed opened files with a bare ``Image.open(...).convert("RGB")``: EXIF orientation was ignored
(bug B18), transparent pixels turned black, 16-bit greyscale clipped to white, colours tagged with a
wide-gamut profile (an iPhone's Display P3, a camera's Adobe RGB) came out dull, and a corrupt or
enormous file crashed the run. Here decoding is the one place that knows those rules, and every
failure is reported as ``ImageDecodeError`` with the reason so a pass can record it per image.
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps

from .buckets import assign_bucket, cover_crop, original_size, parse_bucket

# Modes whose transparency is composited onto white (a black background invents dark content).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# High-bit-depth greyscale modes, and the full-scale value that maps to 255.
_WIDE_GREY_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}

# Modes whose pixels an RGB ICC profile describes (a palette's entries are RGB).
_RGB_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA"})
# An ICC profile's colour space -> the mode its pixels must be in for the transform to sRGB.
_ICC_INPUT_MODES = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}
_SRGB = ImageCms.createProfile("sRGB")

# warnings.catch_warnings swaps the process-wide filter list; this keeps our own decoder threads
# from restoring each other's filters mid-way.
_WARNING_FILTERS_LOCK = threading.Lock()


class ImageDecodeError(Exception):
    """A raw file that cannot be used as an image; the message says why."""


@dataclass(frozen=True)
class ImageFacts:
    width: int  # after EXIF orientation
    height: int
    aspect_bucket: str
    format: str  # Pillow's format name, e.g. "JPEG"
    mode: str  # the file's own colour mode, before conversion to RGB
    frames: int  # 1 for still images
    color_profile: str | None  # description of the embedded ICC profile converted to sRGB; None: none applied


def decode_image(path: Path, *, max_pixels: int | None = None) -> Image.Image:
    """The image at ``path`` as upright sRGB (first frame if animated), or ``ImageDecodeError``.

    An embedded ICC profile that describes the pixels (RGB for colour images, CMYK for CMYK, grey for
    8-bit greyscale) is converted to sRGB; untagged images are taken to be sRGB already.

    ``max_pixels`` lowers the decompression-bomb limit below Pillow's ``Image.MAX_IMAGE_PIXELS``
    (which is honoured too, never changed).
    """
    image, _ = _decode(Path(path), max_pixels, convert=True)
    assert image is not None
    return image


def read_facts(path: Path) -> ImageFacts:
    """Facts about the image at ``path``, after a full decode (so a corrupt file fails here); the
    pixels are not converted, which costs as much again for a wide-gamut photo."""
    _, facts = _decode(Path(path), None, convert=False)
    return facts


def model_input(
    image: Image.Image,
    aspect_bucket: str,
    *,
    mode: Literal["bucket", "original"] = "bucket",
    max_pixels: int = 4 * 1024 * 1024,
) -> Image.Image:
    """What a model sees: the bucket's cover-crop, or the whole image at sides that are multiples of 16."""
    if mode == "bucket":
        return cover_crop(image, parse_bucket(aspect_bucket))
    if mode == "original":
        size = original_size(image.width, image.height, 16, max_pixels)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
    raise ValueError(f"unknown model input mode {mode!r}; expected 'bucket' or 'original'")


def _decode(path: Path, max_pixels: int | None, *, convert: bool) -> tuple[Image.Image | None, ImageFacts]:
    try:
        with _open_checked(path, max_pixels) as opened:
            frames = getattr(opened, "n_frames", 1)
            opened.seek(0)
            opened.load()  # the full decode: truncation and corrupt data surface here
            upright = ImageOps.exif_transpose(opened)
            profile = _embedded_profile(upright.mode, opened.info.get("icc_profile"))
            facts = ImageFacts(
                width=upright.width,
                height=upright.height,
                aspect_bucket=assign_bucket(upright.width, upright.height),
                format=opened.format or "unknown",
                mode=opened.mode,
                frames=frames,
                color_profile=profile.description if profile else None,
            )
            image = _to_srgb(upright, profile) if convert else None
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"file not found: {path}") from exc
    # Pillow's plugins raise many types on bad data (OSError, SyntaxError, struct.error,
    # IndexError, ...); all of them mean "not a usable image".
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode {path.name}: {type(exc).__name__}: {exc}") from exc
    return image, facts


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb warning turned into an ImageDecodeError."""
    with _WARNING_FILTERS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombWarning as exc:
            raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageDecodeError(f"decompression bomb: {width}x{height} exceeds the limit of {max_pixels} pixels")
    return image


@dataclass(frozen=True)
class _Profile:
    """An embedded ICC profile that describes an image's pixels, ready to convert them to sRGB."""

    transform: ImageCms.ImageCmsTransform
    input_mode: str  # "RGB", "CMYK" or "L"
    description: str


def _embedded_profile(mode: str, icc_profile: bytes | None) -> _Profile | None:
    """The profile to convert pixels of ``mode`` through; None without one, for an unreadable or an
    sRGB one, or for one that describes other pixels (an RGB profile on a greyscale image)."""
    profile = _profile_from_icc(icc_profile) if icc_profile else None
    if profile is None:
        return None
    applies = mode in _RGB_MODES if profile.input_mode == "RGB" else mode == profile.input_mode
    return profile if applies else None


@functools.lru_cache(maxsize=32)
def _profile_from_icc(icc_profile: bytes) -> _Profile | None:
    """Cached: a photo set holds a handful of distinct profiles, and building a transform takes a while."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        input_mode = _ICC_INPUT_MODES.get(profile.profile.xcolor_space.strip())
        description = profile.profile.profile_description.strip() or ImageCms.getProfileName(profile).strip()
        # Converting sRGB to sRGB changes nothing and costs as much as decoding the photo.
        if input_mode is None or description.lower().startswith("srgb"):
            return None
        # NOCACHE: LittleCMS's one-pixel cache is not safe when decoding threads share the transform.
        transform = ImageCms.buildTransform(profile, _SRGB, input_mode, "RGB", flags=ImageCms.Flags.NOCACHE)
    except (OSError, ImageCms.PyCMSError):
        return None
    return _Profile(transform, input_mode, description or "unnamed ICC profile")


def _to_srgb(image: Image.Image, profile: _Profile | None) -> Image.Image:
    """8-bit sRGB RGB: through ``profile`` when there is one, else as if the pixels were sRGB already."""
    if profile is None:
        return _to_rgb(image)
    if profile.input_mode == "RGB":
        return profile.transform.apply(_to_rgb(image))  # transparency is composited first, in the file's space
    return profile.transform.apply(image)  # CMYK, 8-bit grey


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _WIDE_GREY_FULL_SCALE:
        return _scaled_grey(np.asarray(image, dtype=np.float64), _WIDE_GREY_FULL_SCALE[mode])
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Float images are stored either normalised ([0, 1]) or on the 8-bit scale.
        full_scale = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
        return _scaled_grey(values, full_scale)
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX and P without transparency: Pillow's conversion is right.
    return image.convert("RGB")


def _scaled_grey(values: np.ndarray, full_scale: float) -> Image.Image:
    """Map greyscale values on [0, full_scale] to 8 bits (Pillow's own conversion clips at 255)."""
    scaled = np.clip(np.nan_to_num(values) * (255.0 / full_scale), 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")  # 2-D uint8 -> "L"
