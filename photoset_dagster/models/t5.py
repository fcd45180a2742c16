"""T5 encoder hidden states of captions: (max_length, d_model) float16 plus the tokenizer's attention mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..core.artefacts import Recipe
from .common import ModelSettings, guarded_load

if TYPE_CHECKING:  # torch is imported where it runs: loading the definitions stays fast
    import torch

MODEL_ENV_VAR = "PHOTOSET_T5_MODEL"


@dataclass(frozen=True)
class T5Settings(ModelSettings):
    # float16, as the seed computed it, and the dtype the states are stored in. It moves states by up
    # to 0.004 on the tiny model and 0.003 at T5-Large's 24 layers with random weights; bfloat16 by
    # 0.025 and 0.08. Hugging Face's T5 keeps its feed-forward output projection in float32 and clamps
    # float16 activations, and a row that still overflows is refused by encode(), never stored.
    DEFAULT_DTYPE: ClassVar[str] = "float16"

    model_id: str = "t5-large"
    dtype: str = DEFAULT_DTYPE
    max_length: int = 77

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")

    def recipe(self) -> Recipe:
        return self._recipe("t5_hidden", max_length=self.max_length, padding="max_length", truncation=True)

    def load(self) -> T5TextEncoder:
        # AutoModel would build the encoder-decoder T5Model; only the encoder is wanted.
        from transformers import AutoTokenizer, T5EncoderModel

        device, dtype = self.torch_device(), self.torch_dtype()

        def load() -> T5TextEncoder:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, revision=self.revision)
            model = T5EncoderModel.from_pretrained(self.model_id, revision=self.revision, dtype=dtype)
            return T5TextEncoder(model.to(device).eval(), tokenizer, self.max_length)

        return guarded_load("t5", "T5", self.model_id, MODEL_ENV_VAR, load)


class T5TextEncoder:
    def __init__(self, model: torch.nn.Module, tokenizer: object, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_size: int = model.config.d_model

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hidden (B, L, D) float16, mask (B, L) uint8): the full padded sequence and the tokenizer's
        own mask (1 for tokens including EOS, 0 for padding), as the training model's attention expects."""
        import torch

        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        parameter = next(self.model.parameters())
        with torch.inference_mode():
            hidden = self.model(
                input_ids=tokens["input_ids"].to(parameter.device),
                attention_mask=tokens["attention_mask"].to(parameter.device),
            ).last_hidden_state
            stored = hidden.float().half().cpu().numpy()
        for row in range(len(stored)):
            if not np.isfinite(stored[row]).all():
                raise ValueError(f"non-finite T5 hidden states for caption row {row} (float16 overflow or NaN)")
        return stored, tokens["attention_mask"].numpy().astype(np.uint8)
