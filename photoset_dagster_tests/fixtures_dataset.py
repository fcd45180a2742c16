"""Fixtures for the dataset side: synthetic images whose artefacts are written by the real core functions.

Arrays are tiny (DINOv3 (32,), VAE (16, 6, 8), T5 (8, 16)) so tests stay fast; every shape is taken from
the sidecars, so the code under test treats them exactly like the seed's full-size arrays.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from photoset_dagster.core.artefacts import Recipe, sha256_file, text_hash, write_json_artefact, write_npy_artefact
from photoset_dagster.core.buckets import parse_bucket
from photoset_dagster.core.layout import DataLayout
from photoset_dagster.core.links import ensure_approved_link

ALL_KINDS = ("facts", "captions", "dinov3", "vae_latents", "t5_hidden")
T5_ROWS = 8
T5_HIDDEN = 16
DINOV3_DIM = 32
VAE_INPUT_SIZE = (64, 48)  # [w, h] -> latents (16, 6, 8)


def tree_snapshot(root: os.PathLike) -> dict[str, bytes | str]:
    """Every file under ``root`` with its bytes (links: their target), to prove that nothing changed.
    The lock file is left out: taking the data lock creates it, and it holds nothing."""
    state: dict[str, bytes | str] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name != "data.lock":
                state[path] = os.readlink(path) if os.path.islink(path) else Path(path).read_bytes()
    return state


def make_recipes(version: str = "v1") -> dict[str, Recipe]:
    return {
        "captions": Recipe("captions", {"backend": "test", "prompt": version}),
        "dinov3": Recipe("dinov3", {"model": "tiny-dinov3", "version": version}),
        "vae_latents": Recipe("vae_latents", {"model": "tiny-vae", "version": version}),
        "t5_hidden": Recipe("t5_hidden", {"model": "tiny-t5", "max_length": T5_ROWS, "version": version}),
    }


def attention_mask(tokens: int, rows: int = T5_ROWS) -> list[int]:
    return [1] * tokens + [0] * (rows - tokens)


@dataclass
class SyntheticImage:
    image_id: str
    caption: str
    bucket: str
    ext: str
    width: int
    height: int
    raw_sha256: str
    mask: list[int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # npy kind -> what was stored


@dataclass
class DatasetFactory:
    """Writes synthetic images into ``layout`` the way the pipeline's passes would."""

    layout: DataLayout
    recipes: dict[str, Recipe]

    def _rng(self, image_id: str) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little"))

    def add(
        self,
        image_id: str,
        *,
        bucket: str = "1024x1024",
        caption: str | None = None,
        ext: str = "jpg",
        kinds: Sequence[str] = ALL_KINDS,
        tokens: int = 5,
    ) -> SyntheticImage:
        """Raw file, approved link and the artefacts of ``kinds`` for one image, all current."""
        rng = self._rng(image_id)
        raw = self.layout.raw_path(image_id)
        raw.write_bytes(rng.bytes(256))
        ensure_approved_link(self.layout, image_id, ext)
        width, height = parse_bucket(bucket)
        image = SyntheticImage(
            image_id=image_id,
            caption=caption if caption is not None else f"a photo of {image_id}, caf\u00e9 light",
            bucket=bucket,
            ext=ext,
            width=width,
            height=height,
            raw_sha256=sha256_file(raw),
            mask=attention_mask(tokens),
        )
        if "facts" in kinds:
            self.write_facts(image)
        if "captions" in kinds:
            self.write_caption(image_id, image.caption, raw_sha256=image.raw_sha256)
        if "dinov3" in kinds:
            image.arrays["dinov3"] = rng.standard_normal(DINOV3_DIM).astype(np.float32)
            self.write_array(
                "dinov3", image_id, image.arrays["dinov3"], raw_sha256=image.raw_sha256, extra={"patches": False}
            )
        if "vae_latents" in kinds:
            w, h = VAE_INPUT_SIZE
            image.arrays["vae_latents"] = rng.standard_normal((16, h // 8, w // 8)).astype(np.float16)
            self.write_array(
                "vae_latents", image_id, image.arrays["vae_latents"], raw_sha256=image.raw_sha256,
                extra={"input_size": [w, h]},
            )
        if "t5_hidden" in kinds:
            image.arrays["t5_hidden"] = self.write_t5(image_id, image.caption, image.mask)
        return image

    def write_facts(self, image: SyntheticImage, **overrides: object) -> None:
        stat = self.layout.raw_path(image.image_id).stat()
        body = {
            "ext": image.ext, "width": image.width, "height": image.height, "aspect_bucket": image.bucket,
            "format": "JPEG", "mode": "RGB", "frames": 1, "raw_size": stat.st_size, "raw_mtime_ns": stat.st_mtime_ns,
            "raw_inode": stat.st_ino,
            **overrides,
        }
        write_json_artefact(self.layout, "facts", image.image_id, body, None, {"raw_sha256": image.raw_sha256})

    def write_caption(self, image_id: str, caption: str, *, raw_sha256: str, recipe: Recipe | None = None) -> None:
        write_json_artefact(
            self.layout, "captions", image_id, {"caption": caption, "backend": "test"},
            recipe or self.recipes["captions"], {"raw_sha256": raw_sha256},
        )

    def write_array(
        self, kind: str, image_id: str, array: np.ndarray, *, raw_sha256: str, extra: dict, recipe: Recipe | None = None
    ) -> None:
        write_npy_artefact(
            self.layout, kind, image_id, array, recipe or self.recipes[kind], {"raw_sha256": raw_sha256}, extra
        )

    def write_t5(
        self, image_id: str, caption: str, mask: list[int], *, rows: int = T5_ROWS, recipe: Recipe | None = None
    ) -> np.ndarray:
        hidden = self._rng(image_id + caption).standard_normal((rows, T5_HIDDEN)).astype(np.float16)
        write_npy_artefact(
            self.layout, "t5_hidden", image_id, hidden, recipe or self.recipes["t5_hidden"],
            {"caption_sha256": text_hash(caption)}, {"attention_mask": mask, "token_count": sum(mask)},
        )
        return hidden


@pytest.fixture
def recipes() -> dict[str, Recipe]:
    return make_recipes()


@pytest.fixture
def dataset_factory(
    layout: DataLayout, recipes: dict[str, Recipe], monkeypatch: pytest.MonkeyPatch
) -> DatasetFactory:
    # Durability is not what these tests observe, and each fsync costs milliseconds on CI disks.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    return DatasetFactory(layout, recipes)
