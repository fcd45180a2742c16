"""DINOv3 ViT image embeddings: the CLS vector (always) and the spatial patch tokens (optional)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from ..core.artefacts import Recipe
from .common import ModelSettings, guarded_load, pixels_on

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

MODEL_ENV_VAR = "PHOTOSET_DINOV3_MODEL"
# Stage 1 embedded the full original image with the checkpoint's default preprocessing; keeping that
# input means migrated Stage-1 CLS vectors and new ones stay comparable (the seed mixed two, bug B2).
CLS_INPUT = "full-image, processor default"
# Pillow's resampling codes in preprocessor_config.json -> torch's interpolation modes.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Dinov3Settings(ModelSettings):
    # float32, as Stage 1 computed the CLS vectors that are migrated under this recipe. bfloat16 moves
    # the CLS by up to 0.023 on the tiny model (0.7 % of its range; float16: 0.003), and by 0.05 at
    # ViT-L's 24 layers with random weights (float16: 0.007); float32 costs little at 224 x 224.
    DEFAULT_DTYPE: ClassVar[str] = "float32"

    model_id: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    dtype: str = DEFAULT_DTYPE
    patch_tokens: bool = False

    def recipe(self) -> Recipe:
        return self._recipe("dinov3", cls_input=CLS_INPUT, patch_tokens=self.patch_tokens)

    def load(self) -> Dinov3Encoder:
        from transformers import AutoModel

        device, dtype = self.torch_device(), self.torch_dtype()

        def load() -> Dinov3Encoder:
            model = AutoModel.from_pretrained(self.model_id, revision=self.revision, dtype=dtype)
            processor = load_image_processor(self.model_id, self.revision)
            return Dinov3Encoder(model.to(device).eval(), processor)

        return guarded_load("dinov3", "DINOv3", self.model_id, MODEL_ENV_VAR, load)


def load_image_processor(model_id: str, revision: str | None = None) -> Any:
    """The checkpoint's image processor, or the PIL ViT processor reading the same config.

    Only its settings are used (see :class:`Preprocessing`), so torchvision, which DINOv3's own
    processor class needs, is not a dependency.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_id, revision=revision)
    except ImportError:
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil.from_pretrained(model_id, revision=revision)


@dataclass(frozen=True)
class Preprocessing:
    """The checkpoint's preprocessing, run on the model's device in float32 in the order of DINOv3's
    own processor: rescale, resize (antialiased), normalise.

    The CPU threads only decode; a 12 MP photo goes to the device as bytes and is shrunk there, so
    preprocessing never holds the model up.
    """

    size: tuple[int, int]  # (height, width) of the CLS input
    resample: str
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, processor: Any) -> Preprocessing:
        """The settings of a transformers image processor; refuses steps it does not reproduce."""
        height, width = processor.size.get("height"), processor.size.get("width")
        if not (processor.do_resize and height and width) or getattr(processor, "do_center_crop", False):
            raise ValueError(f"image processor {type(processor).__name__} does not resize to a fixed size uncropped")
        resample = _RESAMPLE_MODES.get(int(processor.resample))
        if resample is None:
            raise ValueError(f"unsupported resample {processor.resample!r}; expected bilinear (2) or bicubic (3)")
        normalise = processor.do_normalize
        return cls(
            size=(int(height), int(width)),
            resample=resample,
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=tuple(processor.image_mean) if normalise else (0.0, 0.0, 0.0),
            std=tuple(processor.image_std) if normalise else (1.0, 1.0, 1.0),
        )

    def __call__(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float32 model input at ``size`` (height, width)."""
        import torch

        values = pixels.float() * self.rescale_factor
        if tuple(values.shape[-2:]) != size:
            values = torch.nn.functional.interpolate(
                values, size=size, mode=self.resample, align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, device=values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=values.device).view(1, 3, 1, 1)
        return (values - mean) / std


class Dinov3Encoder:
    """A loaded DINOv3 model and its image processor. Token layout: [CLS, registers..., patches...]."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.preprocessing = Preprocessing.of(processor)
        self.hidden_size: int = model.config.hidden_size
        self.num_register_tokens: int = getattr(model.config, "num_register_tokens", 0)
        self.patch_size: int = model.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, H, W) float32 CLS input on the device. Each image is resized on its own: full photos
        differ in size."""
        import torch

        size = self.preprocessing.size
        return torch.cat([self.preprocessing(pixels_on(self.device, [image]), size) for image in images])

    def embed_cls(self, images: list[Image.Image]) -> np.ndarray:
        """(B, hidden) float32 ``pooler_output`` (the normed CLS token) of the full images."""
        return self._forward(self.pixel_values(images)).pooler_output.float().cpu().numpy()

    def embed_patches(self, images: list[Image.Image]) -> np.ndarray:
        """(B, (h/16)*(w/16), hidden) float32 patch tokens, row-major, of same-size images.

        The model silently floors sizes that are not multiples of the patch size, so that is refused.
        """
        sizes = {image.size for image in images}
        if len(sizes) != 1:
            raise ValueError(f"embed_patches needs images of one size, got {sorted(sizes)}")
        ((width, height),) = sizes
        if width % self.patch_size or height % self.patch_size:
            raise ValueError(f"image size {width}x{height} is not a multiple of the patch size {self.patch_size}")
        pixels = self.preprocessing(pixels_on(self.device, images), (height, width))  # no resize: same size
        hidden = self._forward(pixels).last_hidden_state
        # Registers sit right after CLS; the seed sliced [1:-4] and shifted every patch by 4 (bug B1).
        return hidden[:, 1 + self.num_register_tokens :].float().cpu().numpy()

    def _forward(self, pixel_values: torch.Tensor) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(pixel_values=pixel_values.to(self.dtype))
