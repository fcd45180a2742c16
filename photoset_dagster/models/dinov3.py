"""DINOv3 ViT image embeddings: the CLS vector (always) and the spatial patch tokens (optional)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..core.artefacts import Recipe
from .common import ModelSettings, guarded_load

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

MODEL_ENV_VAR = "PHOTOSET_DINOV3_MODEL"
# Stage 1 embedded the full original image with the checkpoint's default preprocessing; keeping that
# input means migrated Stage-1 CLS vectors and new ones stay comparable (the seed mixed two, bug B2).
CLS_INPUT = "full-image, processor default"


@dataclass(frozen=True)
class Dinov3Settings(ModelSettings):
    model_id: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"
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
    """The checkpoint's image processor, or the PIL ViT processor reading the same config."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_id, revision=revision)
    except ImportError:
        # DINOv3's own processor exists only with a torchvision backend. The PIL ViT processor reads
        # the same preprocessor_config.json (size, mean/std, bilinear); it resizes before rescaling,
        # so values differ slightly from the torchvision path, shapes do not.
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil.from_pretrained(model_id, revision=revision)


class Dinov3Encoder:
    """A loaded DINOv3 model and its image processor. Token layout: [CLS, registers..., patches...]."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.hidden_size: int = model.config.hidden_size
        self.num_register_tokens: int = getattr(model.config, "num_register_tokens", 0)
        self.patch_size: int = model.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed_cls(self, images: list[Image.Image]) -> np.ndarray:
        """(B, hidden) float32 ``pooler_output`` (the normed CLS token) of the full images."""
        inputs = self.processor(images=images, return_tensors="pt")
        return self._forward(inputs["pixel_values"]).pooler_output.float().cpu().numpy()

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
        inputs = self.processor(
            images=images, size={"height": height, "width": width}, do_center_crop=False, return_tensors="pt"
        )
        hidden = self._forward(inputs["pixel_values"]).last_hidden_state
        # Registers sit right after CLS; the seed sliced [1:-4] and shifted every patch by 4 (bug B1).
        return hidden[:, 1 + self.num_register_tokens :].float().cpu().numpy()

    def _forward(self, pixel_values: torch.Tensor) -> Any:
        import torch
        with torch.inference_mode():
            return self.model(pixel_values=pixel_values.to(self.device, self.dtype))
