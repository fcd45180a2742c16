"""core.images: every odd file a photo list can hold decodes to upright RGB or fails with a reason."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, features

from photoset_dagster.core.images import ImageDecodeError, ImageFacts, decode_image, model_input, read_facts

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(path: Path, image: Image.Image, fmt: str, **params: object) -> Path:
    image.save(path, format=fmt, **params)
    return path


def _halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def test_exif_orientation_is_applied_to_pixels_and_facts(tmp_path: Path) -> None:
    # Stored landscape, left red / right blue; orientation 6 means "rotate 90° clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated", _halves((64, 32), RED, BLUE), "JPEG", exif=exif, quality=95)

    image = decode_image(path)

    assert image.mode == "RGB" and image.size == (32, 64)
    assert _close(image.getpixel((16, 4)), RED) and _close(image.getpixel((16, 60)), BLUE)
    facts = read_facts(path)
    assert facts == ImageFacts(
        width=32, height=64, aspect_bucket="704x1344", format="JPEG", mode="RGB", frames=1, color_profile=None
    )


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(tmp_path / "cmyk", Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(path)
    assert image.mode == "RGB" and _close(image.getpixel((5, 5)), RED)
    assert read_facts(path).mode == "CMYK"


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    image = decode_image(_save(tmp_path / "rgba", rgba, "PNG"))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 1)) == RED
    assert _close(image.getpixel((2, 2)), (127, 127, 127), 2)

    la = Image.new("LA", (4, 4), (0, 0))
    assert decode_image(_save(tmp_path / "la", la, "PNG")).getpixel((0, 0)) == WHITE


def test_palette_with_transparent_index_is_white_there(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    palette.putpixel((3, 3), 1)
    path = _save(tmp_path / "p", palette, "GIF", transparency=0)
    image = decode_image(path)
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((3, 3)) == RED


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    path = _save(tmp_path / "grey16", Image.fromarray(values), "PNG")
    assert read_facts(path).mode.startswith("I")
    image = decode_image(path)
    # 65535 -> 255 and 32768 -> 128; Pillow's own convert() would clip 1000 to 255.
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_float_greyscale_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = decode_image(_save(tmp_path / "float", Image.fromarray(values), "TIFF"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_animated_gif_gives_first_frame_and_counts_frames(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE, WHITE)]
    path = tmp_path / "anim"
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert _close(decode_image(path).getpixel((8, 8)), RED)
    facts = read_facts(path)
    assert (facts.format, facts.frames) == ("GIF", 3)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGBA", (16, 16), colour + (255,)) for colour in (BLUE, RED)]
    path = tmp_path / "anim_webp"
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert decode_image(path).getpixel((8, 8)) == BLUE
    assert read_facts(path).frames == 2


def test_truncated_file_fails_with_the_reason(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    path = tmp_path / "truncated"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(path)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_or_unknown_bytes_fail_as_decode_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="cannot decode corrupt"):
        read_facts(path)


def test_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "absent")


def test_max_pixels_rejects_large_images(tmp_path: Path) -> None:
    path = _save(tmp_path / "big", Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(path, max_pixels=9_999)


@pytest.mark.parametrize("limit", [6_000, 4_000])  # warning range (limit < pixels <= 2*limit), error range
def test_pillow_bomb_limit_is_an_error_and_no_warning_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    path = _save(tmp_path / "bomb", Image.new("RGB", (100, 100)), "PNG")  # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any escaping warning fails the test
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            decode_image(path)
    assert Image.MAX_IMAGE_PIXELS == limit  # decode_image never changes the global


# --- colour management ----------------------------------------------------------------------------

# Display P3's primaries adapted to D50 (the ICC connection space), as in Apple's Display P3 profile.
DISPLAY_P3 = ((0.51512, 0.24120, -0.00105), (0.29198, 0.69225, 0.04189), (0.15710, 0.06657, 0.78407))
# sRGB's, likewise (IEC 61966-2-1, Bradford-adapted): what LittleCMS's built-in sRGB profile holds.
SRGB_D50 = ((0.4360747, 0.2225045, 0.0139322), (0.3850649, 0.7168786, 0.0971045), (0.1430804, 0.0606169, 0.7141733))
D50 = (0.9642, 1.0, 0.8249)


def _matrix_profile(description: str, colorants: tuple[tuple[float, float, float], ...], gamma: float) -> bytes:
    """A real ICC v2 display profile (matrix/TRC), written byte by byte: ImageCms builds only sRGB."""

    def s15f16(*values: float) -> bytes:
        return b"".join(struct.pack(">i", round(value * 65536)) for value in values)

    text = description.encode("ascii") + b"\0"
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = {
        b"desc": b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(78),  # no Unicode/Mac names
        b"wtpt": b"XYZ " + bytes(4) + s15f16(*D50),
        **{name: b"XYZ " + bytes(4) + s15f16(*xyz) for name, xyz in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants)},
        b"rTRC": curve, b"gTRC": curve, b"bTRC": curve,
        b"cprt": b"text" + bytes(4) + b"public domain\0",
    }  # fmt: skip
    bodies = [body + bytes(-len(body) % 4) for body in tags.values()]
    offset = 128 + 4 + 12 * len(tags)
    table = struct.pack(">I", len(tags))
    for name, body in zip(tags, bodies):
        table += name + struct.pack(">II", offset, len(body))
        offset += len(body)
    header = (
        struct.pack(">I", offset) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
        + b"acsp" + bytes(28) + s15f16(*D50) + bytes(48)
    )  # fmt: skip
    return header + table + b"".join(bodies)


def _p3_to_srgb(value: tuple[int, int, int], gamma: float) -> np.ndarray:
    """The expected conversion, by the colour maths: decode, to XYZ (D50), to linear sRGB, encode."""
    linear = (np.array(value) / 255) ** gamma
    srgb = np.clip(np.linalg.solve(np.array(SRGB_D50).T, np.array(DISPLAY_P3).T @ linear), 0, 1)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return encoded * 255


P3_GAMMA = 2.2
P3_PROFILE = _matrix_profile("Display P3 (photoset test)", DISPLAY_P3, P3_GAMMA)
SKIN, FOLIAGE, GREY = (180, 120, 80), (40, 160, 60), (128, 128, 128)


def _swatches(mode: str = "RGB") -> Image.Image:
    """Three 16-pixel squares (JPEG keeps flat blocks exact enough); sample them at ``_swatch(x)``."""
    image = Image.new(mode, (48, 16))
    for x, colour in enumerate((SKIN, FOLIAGE, GREY)):
        image.paste(colour + ((255,) if mode == "RGBA" else ()), (16 * x, 0, 16 * x + 16, 16))
    return image


def _swatch(x: int) -> tuple[int, int]:
    return 16 * x + 8, 8


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 1.0), ("JPEG", 4.0)])
def test_display_p3_photo_is_converted_to_srgb(tmp_path: Path, fmt: str, tolerance: float) -> None:
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    path = _save(tmp_path / "p3", _swatches(), fmt, icc_profile=P3_PROFILE, **options)
    naive = Image.open(path).convert("RGB")  # what the seed did: the P3 numbers read as sRGB
    image = decode_image(path)

    assert read_facts(path).color_profile == "Display P3 (photoset test)"
    for x, colour in enumerate((SKIN, FOLIAGE, GREY)):
        np.testing.assert_allclose(image.getpixel(_swatch(x)), _p3_to_srgb(colour, P3_GAMMA), atol=tolerance)
    # The same numbers mean more saturated colours in P3: in sRGB the dominant channel rises, the others fall.
    (r, g, b), (naive_r, naive_g, naive_b) = image.getpixel(_swatch(0)), naive.getpixel(_swatch(0))
    assert r > naive_r + 8 and b < naive_b - 8
    (r, g, b), (naive_r, naive_g, naive_b) = image.getpixel(_swatch(1)), naive.getpixel(_swatch(1))
    assert g > naive_g and r < naive_r - 20 and b < naive_b - 20


def test_transparency_of_a_tagged_image_stays_white(tmp_path: Path) -> None:
    rgba = _swatches("RGBA")
    rgba.paste((0, 0, 0, 0), (32, 0, 48, 16))
    image = decode_image(_save(tmp_path / "p3a", rgba, "PNG", icc_profile=P3_PROFILE))
    assert image.getpixel(_swatch(2)) == WHITE
    np.testing.assert_allclose(image.getpixel(_swatch(0)), _p3_to_srgb(SKIN, P3_GAMMA), atol=1.0)


def test_profiles_that_change_nothing_or_do_not_apply_are_not_converted(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cases = {
        "srgb": (_swatches(), srgb),  # already sRGB: nothing to convert
        "grey": (Image.new("L", (48, 16), 100), P3_PROFILE),  # an RGB profile says nothing about grey pixels
        "broken": (_swatches(), b"not an ICC profile"),
    }
    for name, (image, profile) in cases.items():
        path = _save(tmp_path / name, image, "PNG", icc_profile=profile)
        assert read_facts(path).color_profile is None, name
        assert decode_image(path).tobytes() == image.convert("RGB").tobytes(), name


def test_model_input_bucket_crop_and_original_size() -> None:
    image = _halves((300, 210), RED, BLUE)
    crop = model_input(image, "1216x832")
    assert crop.size == (1216, 832)

    original = model_input(image, "1216x832", mode="original")
    assert original.size == (304, 208)  # sides rounded to multiples of 16
    capped = model_input(image, "1216x832", mode="original", max_pixels=64 * 64)
    assert capped.size[0] % 16 == 0 and capped.size[1] % 16 == 0
    assert capped.size[0] * capped.size[1] <= 64 * 64
    with pytest.raises(ValueError, match="mode"):
        model_input(image, "1216x832", mode="square")  # type: ignore[arg-type]
