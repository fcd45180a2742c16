"""Tiny random-weight models of the four production classes, built offline.

Each folder is saved with the library's own ``save_pretrained`` and loads through the same
``from_pretrained`` calls production makes with a hub id, so tests and the demo exercise the real
code paths (processors, chat template, tokenizers, configs) at a fraction of the size.

Where a stored artefact's shape depends on the model width, the tiny model keeps the real width:
DINOv3 has hidden_size 1024 (one layer) and T5 has d_model 1024 (one layer), so ``dinov3/<id>.npy``
is (1024,) and ``t5_hidden/<id>.npy`` is (77, 1024) exactly as in production.

Builds are deterministic (``torch.manual_seed`` before each model) and idempotent: a marker file
written last records the build version, and a folder with the current marker is reused as is.
torch, transformers and diffusers are imported inside the builders, so importing this module (as the
test plugins do) stays cheap when the folders already exist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# Bump when a builder changes, so folders built by older code are rebuilt.
BUILD_VERSION = "1"
MARKER_NAME = ".tiny-models-built"

# The hub's preprocessor_config.json of facebook/dinov3-vitl16-pretrain-lvd1689m (a 224² bilinear
# resize with ImageNet mean/std, no centre crop). Written by hand: its processor class needs torchvision.
DINOV3_PREPROCESSOR = {
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

# Gemma 3's published chat template (tokenizer_config.json of google/gemma-3-*-it), image parts included.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Gemma's special tokens in Gemma's id order where it has one (pad 0, eos 1, bos 2, unk 3).
GEMMA_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)  # fmt: skip

_CORPUS = (
    "a photo of a person standing in a room with soft window light and a plain background",
    "a woman in a red dress sits on a wooden chair, hands resting on her knees, camera at eye level",
    "a man with short hair wearing a grey shirt, three quarter view, studio lighting, shallow depth of field",
    "close up portrait, natural light from the left, neutral expression, dark background, centred framing",
    "full body shot outdoors on a beach at sunset, arms raised, wide angle lens, low camera angle",
    "generate a single dense paragraph describing this image for a text to image training dataset",
    "describe only what is visible: subject, pose, clothing, lighting, background, composition and camera angle",
)


@dataclass(frozen=True)
class TinyModels:
    """Folders usable as ``model_id`` for each family; ``flux`` is the root holding ``vae/``."""

    dinov3: Path
    gemma: Path
    flux: Path
    t5: Path


def build_tiny_models(root: Path) -> TinyModels:
    """Build (or reuse) the four tiny model folders under ``root``."""
    root = Path(root)
    models = TinyModels(dinov3=root / "dinov3", gemma=root / "gemma3", flux=root / "flux", t5=root / "t5")
    marker = root / MARKER_NAME
    if marker.is_file() and marker.read_text().strip() == BUILD_VERSION:
        return models
    for folder in (models.dinov3, models.gemma, models.flux, models.t5):
        shutil.rmtree(folder, ignore_errors=True)  # a half-built folder from an interrupted build
    _build_dinov3(models.dinov3)
    _build_gemma3(models.gemma)
    _build_flux_vae(models.flux / "vae")
    _build_t5(models.t5)
    marker.write_text(BUILD_VERSION + "\n")
    return models


def _seed() -> None:
    import torch

    torch.manual_seed(0)


def _build_dinov3(folder: Path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    # Real width (1024) and register count (4); one layer keeps it at ~20 MB. head_dim 64 suits RoPE.
    config = DINOv3ViTConfig(
        hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
        num_register_tokens=4, patch_size=16, image_size=224, layer_norm_eps=1e-5,
    )  # fmt: skip
    _seed()
    DINOv3ViTModel(config).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR, indent=2) + "\n")


def _gemma_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer

    # Byte-fallback BPE like Gemma's; the BPE trainer is deterministic (the Unigram one is not).
    bpe = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        _CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=[*GEMMA_SPECIALS, *byte_tokens])
    )
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = GemmaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Registered as special so "<start_of_turn>" in the chat template is one token, not its bytes.
    tokenizer.add_tokens(list(GEMMA_SPECIALS), special_tokens=True)
    return tokenizer


def build_gemma3_processor(*, image_size: int = 56, image_seq_length: int = 4):
    """The tiny Gemma 3 processor (tokenizer + image processor + chat template).

    The bench reuses it at the real image geometry (896², 256 image tokens) to drive a real-size model.
    """
    from transformers import Gemma3Processor

    try:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers releases name it without the backend suffix
        from transformers import Gemma3ImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=_gemma_tokenizer(),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=image_seq_length,
    )


def gemma3_token_ids(tokenizer) -> dict[str, int]:
    """Config ids that must agree with the tokenizer (the model masks/locates image tokens by id)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": ids("<pad>"),
        "bos_token_id": ids("<bos>"),
        "eos_token_ids": [ids("<eos>"), ids("<end_of_turn>")],
        "boi_token_index": ids("<start_of_image>"),
        "eoi_token_index": ids("<end_of_image>"),
        "image_token_index": ids("<image_soft_token>"),
    }


def _build_gemma3(folder: Path) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    processor = build_gemma3_processor()
    ids = gemma3_token_ids(processor.tokenizer)
    text = Gemma3TextConfig(
        vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=16, sliding_window_pattern=2, max_position_embeddings=1024,
        pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_ids"],
    )  # fmt: skip
    # 56 / 14 = 4 patches a side, pooled to 2 x 2 = 4 image tokens (= the processor's image_seq_length).
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=56, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=ids["boi_token_index"], eoi_token_index=ids["eoi_token_index"],
        image_token_index=ids["image_token_index"],
    )  # fmt: skip
    _seed()
    model = Gemma3ForConditionalGeneration(config).eval()
    # The projector is zero-initialised: left so, the model ignores the image and every caption is the same.
    model.model.multi_modal_projector.mm_input_projection_weight.data.normal_(0, 1.0)
    model.generation_config.eos_token_id = ids["eos_token_ids"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _build_flux_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    # Flux's layout (4 blocks = /8, 16 latent channels, its scaling/shift), 8 channels wide instead of 128-512.
    _seed()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=8, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )  # fmt: skip
    vae.eval().save_pretrained(folder)


def build_t5_tokenizer():
    """A T5 tokenizer over a tiny vocabulary (pad 0, eos 1, unk 2, 100 sentinels, like T5's)."""
    from transformers import T5TokenizerFast

    # A hand-built Unigram vocabulary (the tokenizers Unigram trainer is not deterministic).
    # Scores: whole words above single characters, strictly decreasing, so segmentation is stable.
    words = sorted({word for line in _CORPUS for word in line.replace(",", " ").replace(":", " ").split()})
    chars = sorted({char for line in _CORPUS for char in line if char != " "} | set("0123456789.,:;!?'-"))
    pieces = ["▁"] + [f"▁{word}" for word in words] + chars
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -1.0 - index * 0.01) for index, piece in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=512)


def _build_t5(folder: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_t5_tokenizer()
    # t5-large's d_model (1024) and its relu / tied-embedding variant; one layer each side. The hub repo
    # holds the full encoder-decoder, so this does too (production loads only the encoder from it).
    config = T5Config(
        vocab_size=len(tokenizer), d_model=1024, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=2, feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    _seed()
    T5ForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
