#!/usr/bin/env python3
"""Throughput and memory of the model passes at production sizes, on one CUDA GPU, with no downloads.

Real-size architectures (DINOv3 ViT-L/16, the Flux VAE, T5-Large's encoder, Gemma 3 27B) are built
from their published configs with random weights directly on the GPU, then driven through the same
encoder classes the passes use (preprocessing included) at the real bucket sizes. Random weights
change nothing about speed or memory; for captions, end-of-text is disabled so every caption runs to
its token budget, and the time for the configured 500 tokens is extrapolated from a short run.

Rows:
  decode      CPU: decode_image + bucket crop of generated 12 MP JPEGs, thread pool of N workers
  facts/...   a whole pass (run_*_pass) over the generated photos in a temporary data layout
  dinov3/...  Dinov3Encoder.embed_cls / embed_patches
  vae         FluxVaeEncoder.encode (deterministic mode)
  t5          T5TextEncoder.encode at max_length 77 and 512
  caption     TransformersCaptioner.caption, images/s at 500 new tokens (extrapolated)

  python bench/gpu_passes.py            # everything, a few minutes on an H200
  python bench/gpu_passes.py --quick    # fewer sizes and repeats
  python bench/gpu_passes.py --smoke    # tiny models at tiny sizes, CPU is fine: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

PASSES = ("decode", "dinov3", "vae", "t5", "caption")
CAPTION_TOKENS = 500  # CaptionSettings.max_new_tokens

# Published configs (config.json on the hub), as from_pretrained would read them.
DINOV3_VITL16 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_register_tokens": 4, "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-5, "rope_theta": 100.0,
    "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True, "mlp_bias": True,
    "use_gated_mlp": False, "layerscale_value": 1.0, "hidden_act": "gelu",
}  # fmt: skip
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    "force_upcast": True,
}  # fmt: skip
T5_LARGE = {
    "vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16,
    "relative_attention_num_buckets": 32, "feed_forward_proj": "relu", "tie_word_embeddings": True,
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
GEMMA3_27B_TEXT = {
    "vocab_size": 262208, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168,
    "sliding_window": 1024, "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}  # fmt: skip
GEMMA3_27B_VISION = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "image_size": 896, "patch_size": 14, "vision_use_head": False,
}  # fmt: skip
SAMPLE_CAPTION = (
    "A woman stands barefoot on a pale wooden floor in front of a white wall, weight on her left leg, right knee "
    "slightly bent, arms hanging loosely at her sides with fingers relaxed. She wears a sleeveless grey cotton "
    "dress that ends above the knee. Soft daylight from a window on the left lights her face and shoulders and "
    "casts a faint shadow to the right. The frame is vertical, full body, camera at chest height, straight on."
)


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run."""

    device: str
    dtype: str
    buckets: tuple[tuple[int, int], ...]
    photo_size: tuple[int, int]
    photos: int
    decode_workers: tuple[int, ...]
    cls_batches: tuple[int, ...]
    patch_batches: tuple[int, ...]
    vae_batches: tuple[int, ...]
    t5_batches: tuple[int, ...]
    t5_lengths: tuple[int, ...]
    caption_batches: tuple[int, ...]
    caption_probe_tokens: int
    repeats: int
    smoke: bool


@dataclass
class Row:
    name: str
    input: str
    batch: int | str
    images_per_s: float | None = None
    ms_per_batch: float | None = None
    peak_gib: float | None = None
    note: str = ""


def make_plan(args: argparse.Namespace, cuda: bool) -> Plan:
    cpus = os.cpu_count() or 1
    if args.smoke:
        return Plan(
            device="cuda" if cuda else "cpu", dtype="auto", buckets=((64, 64), (48, 80)), photo_size=(640, 480),
            photos=4, decode_workers=(1, 2), cls_batches=(2,), patch_batches=(2,), vae_batches=(2,), t5_batches=(2,),
            t5_lengths=(77,), caption_batches=(2,), caption_probe_tokens=8, repeats=1, smoke=True,
        )  # fmt: skip
    workers = tuple(sorted({1, min(4, cpus), cpus}))
    if args.quick:
        return Plan(
            device="cuda", dtype="auto", buckets=((1024, 1024),), photo_size=(4032, 3024), photos=16,
            decode_workers=workers, cls_batches=(16,), patch_batches=(16,), vae_batches=(4,), t5_batches=(128,),
            t5_lengths=(77, 512), caption_batches=(8,), caption_probe_tokens=32, repeats=2, smoke=False,
        )  # fmt: skip
    return Plan(
        device="cuda", dtype="auto", buckets=((1024, 1024), (832, 1216), (1344, 704)), photo_size=(4032, 3024),
        photos=32, decode_workers=workers, cls_batches=(8, 32), patch_batches=(8, 32), vae_batches=(1, 4, 8),
        t5_batches=(32, 256), t5_lengths=(77, 512), caption_batches=(4, 8, 16), caption_probe_tokens=64, repeats=4,
        smoke=False,
    )  # fmt: skip


# --- measuring ------------------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    torch = _torch()
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _free_memory() -> None:
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(name: str, input_desc: str, batch: int, call: Callable[[], object], repeats: int) -> Row:
    """Mean time of ``call`` after one warm-up (kernel selection, allocator growth), with its peak memory."""
    torch = _torch()
    try:
        call()
        _sync()
        _reset_peak()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        _sync()
        seconds = (time.perf_counter() - started) / repeats
    except torch.cuda.OutOfMemoryError:
        _free_memory()
        return Row(name, input_desc, batch, note="out of memory")
    return Row(name, input_desc, batch, batch / seconds, seconds * 1000, _peak_gib())


def whole_pass(name: str, input_desc: str, batch: int, run: Callable[[], Any]) -> Row:
    """One run_*_pass call: images/s of what it computed (decode, model, atomic writes, all overlapped)."""
    _reset_peak()
    result = run()
    note = f"{len(result.failed)} failed: {next(iter(result.failed.values()))}" if result.failed else ""
    ms = result.seconds * 1000 / max(1, -(-len(result.done) // batch))
    return Row(name, input_desc, batch, result.images_per_s, ms, _peak_gib(), note)


@contextmanager
def section(rows: list[Row], name: str) -> Iterator[None]:
    """Run one pass's measurements; a failure becomes a row instead of ending the whole run."""
    print(f"... {name}", flush=True)
    try:
        yield
    except ImportError as exc:
        rows.append(Row(name, "-", "-", note=f"skipped, missing package: {exc} (carry its wheel)"))
    except Exception as exc:  # report and go on: one broken section must not waste the GPU lease
        rows.append(Row(name, "-", "-", note=f"failed: {type(exc).__name__}: {exc}"[:300]))
    finally:
        _free_memory()


def random_model(model_class: Any, config: Any, plan: Plan) -> Any:
    """A model with random weights, allocated and initialised on the device in its dtype."""
    from photoset_dagster.models.common import resolve_device, resolve_dtype

    torch = _torch()
    device = resolve_device(plan.device)
    with torch.device(device):
        model = model_class._from_config(config, dtype=resolve_dtype(plan.dtype, device))
    return model.eval()


# --- inputs ---------------------------------------------------------------------------------------


def noise_images(size: tuple[int, int], count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def make_photos(folder: Path, plan: Plan) -> list[Path]:
    """JPEGs like camera photos (smooth content, quality 90), alternating landscape and portrait."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = plan.photo_size
    paths = []
    for index in range(plan.photos):
        small = Image.fromarray(np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8))
        size = (width, height) if index % 2 == 0 else (height, width)
        photo = small.resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        path = folder / f"photo{index:04d}"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def photo_layout(root: Path, photos: list[Path]) -> tuple[Any, list[str]]:
    """A data layout holding ``photos`` as approved raw files."""
    from photoset_dagster.core.layout import DataLayout
    from photoset_dagster.core.links import ensure_approved_link

    layout = DataLayout(root)
    layout.ensure_dirs()
    ids = []
    for path in photos:
        if not layout.raw_path(path.name).exists():
            os.link(path, layout.raw_path(path.name))  # same bytes, no copy
        ensure_approved_link(layout, path.name, "jpg")
        ids.append(path.name)
    return layout, ids


# --- the passes -----------------------------------------------------------------------------------


def bench_decode(plan: Plan, photos: list[Path], layout: Any, ids: list[str], rows: list[Row]) -> None:
    from photoset_dagster.core.buckets import assign_bucket
    from photoset_dagster.core.images import decode_image, model_input
    from photoset_dagster.passes import run_facts_pass

    def prepare(path: Path) -> Image.Image:
        image = decode_image(path)
        return model_input(image, assign_bucket(image.width, image.height))

    megapixels = f"{plan.photo_size[0] * plan.photo_size[1] / 1e6:.1f} MP JPEG"
    for workers in plan.decode_workers:
        with ThreadPoolExecutor(workers) as pool:
            started = time.perf_counter()
            list(pool.map(prepare, photos))
            seconds = time.perf_counter() - started
        rows.append(Row("decode+crop (CPU)", megapixels, f"{workers} thr", len(photos) / seconds))
    rows.append(whole_pass("facts pass (CPU)", megapixels, 1, lambda: run_facts_pass(layout, ids)))


def bench_dinov3(plan: Plan, layout: Any, ids: list[str], rows: list[Row], tiny: Any) -> None:
    from photoset_dagster.models.dinov3 import Dinov3Encoder, Dinov3Settings, load_image_processor
    from photoset_dagster.passes import run_dinov3_pass

    settings = Dinov3Settings(device=plan.device, dtype=plan.dtype, patch_tokens=True)
    if plan.smoke:
        encoder = replace(settings, model_id=str(tiny.dinov3)).load()
    else:
        import json

        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        from photoset_dagster.demo.tiny_models import DINOV3_PREPROCESSOR

        with tempfile.TemporaryDirectory() as folder:  # the processor reads the hub's JSON, as in production
            (Path(folder) / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR))
            processor = load_image_processor(folder)
        encoder = Dinov3Encoder(random_model(DINOv3ViTModel, DINOv3ViTConfig(**DINOV3_VITL16), plan), processor)
    note = type(encoder.processor).__name__
    full = plan.photo_size
    photos = noise_images(full, max(plan.cls_batches))
    for batch in plan.cls_batches:
        images = photos[:batch]
        row = timed("dinov3 cls", f"{full[0]}x{full[1]} full", batch, lambda: encoder.embed_cls(images), plan.repeats)
        rows.append(replace(row, note=row.note or note))
    for width, height in plan.buckets:
        crops = noise_images((width, height), max(plan.patch_batches))
        for batch in plan.patch_batches:
            images = crops[:batch]
            rows.append(
                timed("dinov3 cls+patches", f"{width}x{height}", batch,
                      lambda: (encoder.embed_cls(images), encoder.embed_patches(images)), plan.repeats)
            )  # fmt: skip
    batch = plan.patch_batches[-1]
    pass_settings = replace(settings, batch_size=batch)
    rows.append(whole_pass("dinov3 pass+patches", "photos", batch,
                           lambda: run_dinov3_pass(layout, ids, pass_settings, lambda: encoder)))  # fmt: skip


def bench_vae(plan: Plan, layout: Any, ids: list[str], rows: list[Row], tiny: Any) -> None:
    from diffusers import AutoencoderKL

    from photoset_dagster.models.common import resolve_device, resolve_dtype
    from photoset_dagster.models.flux_vae import FluxVaeEncoder, FluxVaeSettings
    from photoset_dagster.passes import run_vae_pass

    settings = FluxVaeSettings(device=plan.device, dtype=plan.dtype)
    if plan.smoke:
        encoder = replace(settings, model_id=str(tiny.flux)).load()
    else:
        torch = _torch()
        device = resolve_device(plan.device)
        with torch.device(device):
            vae = AutoencoderKL.from_config(FLUX_VAE)
        encoder = FluxVaeEncoder(vae.to(resolve_dtype(plan.dtype, device)).eval(), settings)
    for width, height in plan.buckets:
        crops = noise_images((width, height), max(plan.vae_batches))
        for batch in plan.vae_batches:
            images = crops[:batch]
            rows.append(timed("vae", f"{width}x{height}", batch, lambda: encoder.encode(images), plan.repeats))
    batch = plan.vae_batches[-1]
    pass_settings = replace(settings, batch_size=batch)
    rows.append(
        whole_pass("vae pass", "photos", batch, lambda: run_vae_pass(layout, ids, pass_settings, lambda: encoder))
    )


def bench_t5(plan: Plan, rows: list[Row], tiny: Any) -> None:
    from photoset_dagster.demo.tiny_models import build_t5_tokenizer
    from photoset_dagster.models.t5 import T5Settings, T5TextEncoder

    if plan.smoke:
        base = T5Settings(model_id=str(tiny.t5), device=plan.device, dtype=plan.dtype).load()
        model, tokenizer = base.model, base.tokenizer
    else:
        from transformers import T5Config, T5EncoderModel

        # Sequence length, not vocabulary, sets the cost: a tiny tokenizer stands in for T5's (ids stay in range).
        model, tokenizer = random_model(T5EncoderModel, T5Config(**T5_LARGE), plan), build_t5_tokenizer()
    for length in plan.t5_lengths:
        encoder = T5TextEncoder(model, tokenizer, length)
        for batch in plan.t5_batches:
            captions = [SAMPLE_CAPTION] * batch
            rows.append(timed("t5", f"max_length {length}", batch, lambda: encoder.encode(captions), plan.repeats))


def bench_caption(plan: Plan, rows: list[Row], tiny: Any) -> None:
    from photoset_dagster.demo.tiny_models import build_gemma3_processor, gemma3_token_ids
    from photoset_dagster.models.captioner import CaptionSettings

    settings = CaptionSettings(device=plan.device, dtype=plan.dtype)
    if plan.smoke:
        loaded = replace(settings, model_id=str(tiny.gemma)).load()
        model, processor = loaded.model, loaded.processor  # type: ignore[attr-defined]
    else:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        # The tiny tokenizer at Gemma's real image geometry (896 px, 256 image tokens); its special-token
        # ids go into the config so the model finds the image tokens. The text prompt tokenises longer
        # than with Gemma's real vocabulary (byte fallback), so prefill is, if anything, overstated.
        processor = build_gemma3_processor(image_size=896, image_seq_length=256)
        ids = gemma3_token_ids(processor.tokenizer)
        config = Gemma3Config(
            text_config={**GEMMA3_27B_TEXT, "pad_token_id": ids["pad_token_id"], "bos_token_id": ids["bos_token_id"]},
            vision_config=GEMMA3_27B_VISION, mm_tokens_per_image=256, boi_token_index=ids["boi_token_index"],
            eoi_token_index=ids["eoi_token_index"], image_token_index=ids["image_token_index"],
        )  # fmt: skip
        started = time.perf_counter()
        model = random_model(Gemma3ForConditionalGeneration, config, plan)
        model.model.multi_modal_projector.mm_input_projection_weight.data.normal_(0, 0.02)  # zero-initialised
        print(f"    built Gemma 3 27B in {time.perf_counter() - started:.0f} s", flush=True)
    # Random weights may emit end-of-text at once; without it every caption uses its whole budget.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = gemma3_token_ids(processor.tokenizer)["pad_token_id"]
    probe = plan.caption_probe_tokens
    crops = noise_images(plan.buckets[0], max(plan.caption_batches))
    for batch in plan.caption_batches:
        images = crops[:batch]
        prefill = timed("caption", "", batch, _captioner(model, processor, settings, 1, images), plan.repeats)
        full = timed("caption", "", batch, _captioner(model, processor, settings, probe, images), plan.repeats)
        if prefill.ms_per_batch is None or full.ms_per_batch is None:
            rows.append(Row("caption", f"{CAPTION_TOKENS} tokens", batch, note="out of memory"))
            continue
        per_token_ms = (full.ms_per_batch - prefill.ms_per_batch) / (probe - 1)
        if per_token_ms <= 0:  # a probe too short for the timer's noise: report what was measured
            rows.append(Row("caption", f"{probe} tokens", batch, full.images_per_s, full.ms_per_batch, full.peak_gib,
                            "decode time lost in timing noise; not extrapolated"))  # fmt: skip
            continue
        total_ms = prefill.ms_per_batch + (CAPTION_TOKENS - 1) * per_token_ms
        note = f"prefill {prefill.ms_per_batch:.0f} ms, {per_token_ms:.1f} ms/token (from {probe})"
        rows.append(
            Row("caption", f"{CAPTION_TOKENS} tokens", batch, batch * 1000 / total_ms, total_ms, full.peak_gib, note)
        )


def _captioner(
    model: Any, processor: Any, settings: Any, tokens: int, images: list[Image.Image]
) -> Callable[[], object]:
    from photoset_dagster.models.captioner import TransformersCaptioner

    captioner = TransformersCaptioner(model, processor, replace(settings, max_new_tokens=tokens))
    return lambda: captioner.caption(images)


# --- main -----------------------------------------------------------------------------------------


def print_table(rows: list[Row], title: str) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = f"{'pass':<22} {'input':<18} {'batch':>7} {'img/s':>9} {'ms/batch':>9} {'peak GiB':>9}  note"
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(
            f"{row.name:<22} {row.input:<18} {row.batch!s:>7} {fmt(row.images_per_s, '.1f'):>9} "
            f"{fmt(row.ms_per_batch, '.0f'):>9} {fmt(row.peak_gib, '.2f'):>9}  {row.note}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one bucket, one batch size each, fewer repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny models at tiny sizes (CPU is fine)")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma list of {', '.join(PASSES)}")
    parser.add_argument("--workdir", type=Path, help="where generated photos and the data layout go (default: temp)")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.passes.split(",") if name.strip()]
    unknown = set(selected) - set(PASSES)
    if unknown:
        parser.error(f"unknown passes: {', '.join(sorted(unknown))}")

    torch = _torch()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: this benchmark measures a GPU (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # one input size per batch: let cuDNN pick the fastest conv
    plan = make_plan(args, cuda)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    size = "smoke" if plan.smoke else "quick" if args.quick else "full"
    print(f"device: {device_name}; torch {torch.__version__}; plan: {size}")

    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        tiny = None
        if plan.smoke:
            from photoset_dagster.demo.tiny_models import build_tiny_models

            tiny = build_tiny_models(workdir / "tiny_models")
        photos = make_photos(workdir / "photos", plan)
        layout, ids = photo_layout(workdir / "data", photos)
        if "decode" in selected:
            with section(rows, "decode"):
                bench_decode(plan, photos, layout, ids, rows)
        if "dinov3" in selected:
            with section(rows, "dinov3"):
                bench_dinov3(plan, layout, ids, rows, tiny)
        if "vae" in selected:
            with section(rows, "vae"):
                bench_vae(plan, layout, ids, rows, tiny)
        if "t5" in selected:
            with section(rows, "t5"):
                bench_t5(plan, rows, tiny)
        if "caption" in selected:
            with section(rows, "caption"):
                bench_caption(plan, rows, tiny)
    print_table(rows, f"{device_name}, {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
