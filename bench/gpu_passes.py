#!/usr/bin/env python3
"""Can one H200 turn 60,000 photos into the dataset in 1.5 hours? Each model pass at production size,
the CPU preparation that feeds it, and the projection, with no downloads.

Real-size DINOv3 ViT-L/16, Flux VAE and T5-Large encoder are built from their published configs with
random weights, saved, and loaded through the production loaders (``Settings.load()``: the dtype
choice, the on-device preprocessing), then timed at the real input sizes in each family's default
dtype; random weights change nothing about speed or memory. The precision rows run each model in
float32, bfloat16 and float16 and give the largest difference from float32 next to the time.

Captions come from a local vLLM serving Gemma 3 27B with dummy weights, if ``vllm`` is importable
(by this interpreter, or by ``--vllm-python``: vLLM pins its own torch, so it may live in a venv of
its own): in a child process (its start-up and GPU memory stay apart, and a hang is cut off by the
time budget), at photoset's in-flight depths, every caption running to the plan's length. Without
vLLM the row says skipped and the projection gives the caption rate the goal needs.

CPU rates are each stage's preparation (decode, crop, JPEG for captions; facts also hashes the raw
file) on the stage runner's decode threads, over generated 12 MP JPEGs. The projection runs the
stages one after another: each at the slower of its GPU and CPU rates.

  python bench/gpu_passes.py --all      # one CUDA GPU (an H200): about 5 minutes, 8 at most
  python bench/gpu_passes.py --all --vllm-python /opt/vllm/bin/python
  python bench/gpu_passes.py --smoke    # the same code, tiny models and sizes, CPU: under a minute
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

GOAL_IMAGES = 60_000
GOAL_HOURS = 1.5
GOAL_RATE = 11.0  # images/s sustained
DTYPES = ("float32", "bfloat16", "float16")

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
    "max_position_embeddings": 131072,
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
    """Sizes, batches and repeats of one run."""

    name: str
    device: str
    photo_size: tuple[int, int]  # generated camera photos (landscape; every other one portrait)
    photos: int
    bucket: tuple[int, int]  # the crop the VAE, the patch tokens and captions see
    cls_batches: tuple[int, ...]
    patch_batches: tuple[int, ...]
    vae_batches: tuple[int, ...]
    t5_batches: tuple[int, ...]
    precision_batch: int
    repeats: int
    tiny_models: bool  # the tests' tiny models instead of real-size ones
    caption_in_flight: tuple[int, ...]  # vLLM: requests decoding together; the first is photoset's default
    caption_tokens: int  # every caption runs to this length (a dense paragraph; the budget is 500)
    budget_s: float  # the whole run; the vLLM child gets what is left


SMOKE = Plan(
    name="smoke", device="cpu", photo_size=(640, 480), photos=4, bucket=(64, 64), cls_batches=(2, 4),
    patch_batches=(2,), vae_batches=(1, 2), t5_batches=(4, 8), precision_batch=2, repeats=1, tiny_models=True,
    caption_in_flight=(4,), caption_tokens=8, budget_s=60,
)  # fmt: skip
ALL = Plan(
    name="all", device="cuda", photo_size=(4032, 3024), photos=48, bucket=(1024, 1024), cls_batches=(16, 32, 64),
    patch_batches=(8, 16), vae_batches=(4, 8, 16), t5_batches=(64, 256, 1024), precision_batch=4, repeats=3,
    tiny_models=False, caption_in_flight=(64, 128, 256), caption_tokens=250, budget_s=480,
)  # fmt: skip


@dataclass
class Row:
    name: str
    input: str
    batch: int | str
    images_per_s: float | None = None
    ms_per_batch: float | None = None
    peak_gib: float | None = None
    note: str = ""


@dataclass
class Stage:
    """One stage in the projection: its best device rate and its CPU preparation rate (images/s)."""

    name: str
    gpu: float | None  # None: not measured (or, with on_gpu False, no device work)
    cpu: float | None  # None: no CPU preparation of its own
    note: str = ""
    on_gpu: bool = True

    @property
    def rate(self) -> float | None:
        """The slower side; None while a device rate is missing."""
        if self.on_gpu and self.gpu is None:
            return None
        rates = [rate for rate in (self.gpu, self.cpu) if rate is not None]
        return min(rates) if rates else None


@dataclass
class Report:
    workers: int  # the stage runner's decode threads
    rows: list[Row] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)


# --- measuring ------------------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _sync() -> None:
    if _torch().cuda.is_available():
        _torch().cuda.synchronize()


def _peak_gib() -> float | None:
    torch = _torch()
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _free_memory() -> None:
    gc.collect()
    if _torch().cuda.is_available():
        _torch().cuda.empty_cache()


def timed(name: str, input_desc: str, batch: int, call: Callable[[], Any], repeats: int) -> tuple[Row, Any]:
    """(mean time of ``call`` after a warm-up, with its peak memory; the warm-up's output)."""
    torch = _torch()
    try:
        output = call()
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        _sync()
        seconds = (time.perf_counter() - started) / repeats
    except torch.cuda.OutOfMemoryError:
        _free_memory()
        return Row(name, input_desc, batch, note="out of memory"), None
    return Row(name, input_desc, batch, batch / seconds, seconds * 1000, _peak_gib()), output


def best(rows: Sequence[Row]) -> float | None:
    """The best rate among ``rows``, its row marked."""
    measured = [row for row in rows if row.images_per_s is not None]
    if not measured:
        return None
    top = max(measured, key=lambda row: row.images_per_s or 0.0)
    top.note = ("best; " + top.note) if top.note else "best"
    return top.images_per_s


def cpu_rate(prepare: Callable[[Path], object], photos: Sequence[Path], workers: int) -> float:
    """Images/s of ``prepare`` over ``photos`` on ``workers`` threads, as the stage runner decodes ahead."""
    with ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        list(pool.map(prepare, photos))
        return len(photos) / (time.perf_counter() - started)


def precision(
    name: str,
    load: Callable[[str], Any],
    run: Callable[[Any], np.ndarray],
    batch: int,
    default: str,
    repeats: int,
    report: Report,
) -> Any:
    """A row per dtype: time per batch and the largest difference from float32; returns the model
    loaded in the family's ``default`` dtype (the others are freed)."""
    reference, kept = None, None
    for dtype in DTYPES:
        model = load(dtype)
        try:
            row, output = timed(f"{name} {dtype}", "precision", batch, lambda: run(model), repeats)
        except ValueError as exc:  # the encoders refuse non-finite outputs (float16 overflow)
            row, output = Row(f"{name} {dtype}", "precision", batch, note=f"refused: {exc}"[:120]), None
        if output is not None:
            output = np.asarray(output, dtype=np.float32)
            if reference is None:
                reference = output
            scale = float(np.abs(reference).max())
            row.note = f"max |diff| vs float32 {np.abs(output - reference).max():.3g} (outputs up to {scale:.3g})"
        report.rows.append(row)
        if dtype == default:
            kept = model
        model = None  # freed before the next dtype loads
        _free_memory()
    return kept


# --- inputs ---------------------------------------------------------------------------------------


def make_photos(folder: Path, plan: Plan) -> list[Path]:
    """JPEGs like camera photos, alternating landscape and portrait: smooth content plus sensor-like
    noise, so they are as large and as slow to decode as a phone's (a 12 MP one is ~3 MB at quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = plan.photo_size

    def make(index: int) -> Path:
        rng = np.random.default_rng(index)
        size = (width, height) if index % 2 == 0 else (height, width)
        small = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        smooth = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 8, (256, 256, 3)).astype(np.int16)  # tiled: drawing 36 M samples is slow
        reps = (-(-size[1] // 256), -(-size[0] // 256), 1)
        pixels = np.clip(smooth + np.tile(grain, reps)[: size[1], : size[0]], 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        path = folder / f"photo{index:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        return path

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(make, range(plan.photos)))


def cycled(items: Sequence[Any], count: int) -> list[Any]:
    return [items[index % len(items)] for index in range(count)]


@dataclass(frozen=True)
class ModelFolders:
    """Folders the production loaders read, as a hub id would be: DINOv3, Flux (holding vae/), T5."""

    dinov3: Path
    flux: Path
    t5: Path


def model_folders(plan: Plan, workdir: Path) -> ModelFolders:
    """The tiny models for a smoke run; real-size random-weight models, saved, for a full one."""
    if plan.tiny_models:
        from photoset_dagster.demo.tiny_models import build_tiny_models

        tiny = build_tiny_models(workdir / "tiny_models")
        return ModelFolders(tiny.dinov3, tiny.flux, tiny.t5)
    return save_real_size_models(workdir / "real_size_models")


def save_real_size_models(root: Path) -> ModelFolders:
    """DINOv3 ViT-L/16, the Flux VAE and T5-Large's encoder from their configs, random weights."""
    from diffusers import AutoencoderKL
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, T5Config, T5EncoderModel

    from photoset_dagster.demo.tiny_models import DINOV3_PREPROCESSOR, build_t5_tokenizer

    folders = ModelFolders(root / "dinov3", root / "flux", root / "t5")
    torch = _torch()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init where it is fast
        DINOv3ViTModel(DINOv3ViTConfig(**DINOV3_VITL16)).save_pretrained(folders.dinov3)
        AutoencoderKL.from_config(FLUX_VAE).save_pretrained(folders.flux / "vae")
        T5EncoderModel(T5Config(**T5_LARGE)).save_pretrained(folders.t5)
    (folders.dinov3 / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR))
    # Sequence length, not vocabulary, sets T5's cost: a tiny tokenizer stands in (its ids are in range).
    build_t5_tokenizer().save_pretrained(folders.t5)
    _free_memory()
    return folders


# --- the stages -----------------------------------------------------------------------------------


def bench_cpu(plan: Plan, photos: list[Path], report: Report) -> dict[str, float]:
    """Each stage's CPU preparation rate, at the runner's decode threads (and all cores, if more)."""
    from photoset_dagster.core.artefacts import sha256_file
    from photoset_dagster.core.buckets import assign_bucket
    from photoset_dagster.core.images import decode_image, model_input, read_facts
    from photoset_dagster.models.captioner import jpeg_base64

    def crop(path: Path) -> Image.Image:
        image = decode_image(path)
        return model_input(image, assign_bucket(image.width, image.height))

    preparations: dict[str, Callable[[Path], object]] = {
        "facts": lambda path: (read_facts(path), sha256_file(path)),
        "captions": lambda path: jpeg_base64(crop(path)),
        "dinov3": decode_image,  # the CLS input is the full photo (patch tokens add a crop)
        "vae": crop,
    }
    megapixels = f"{plan.photo_size[0] * plan.photo_size[1] / 1e6:.1f} MP JPEG"
    rates = {}
    for stage, prepare in preparations.items():
        for threads in sorted({report.workers, os.cpu_count() or 1}):
            rate = cpu_rate(prepare, photos, threads)
            report.rows.append(Row(f"{stage} prepare (CPU)", megapixels, f"{threads} thr", rate))
            if threads == report.workers:
                rates[stage] = rate
    return rates


def bench_dinov3(
    plan: Plan, folder: Path, photos: list[Image.Image], crops: list[Image.Image], report: Report
) -> float | None:
    from photoset_dagster.models.dinov3 import Dinov3Settings

    settings = Dinov3Settings(model_id=str(folder), device=plan.device)
    sample = photos[: plan.precision_batch]
    encoder = precision(
        "dinov3 cls", lambda dtype: Dinov3Settings(model_id=str(folder), device=plan.device, dtype=dtype).load(),
        lambda model: model.embed_cls(sample), len(sample), settings.compute_dtype, plan.repeats, report,
    )  # fmt: skip
    full = f"{plan.photo_size[0]}x{plan.photo_size[1]} full"
    rows = []
    for batch in plan.cls_batches:
        images = cycled(photos, batch)
        rows.append(timed("dinov3 cls", full, batch, lambda: encoder.embed_cls(images), plan.repeats)[0])
    rate = best(rows)
    report.rows.extend(rows)
    bucket = f"{plan.bucket[0]}x{plan.bucket[1]}"
    for batch in plan.patch_batches:  # patch_tokens is off by default: shown, not projected
        images = cycled(crops, batch)
        row, _ = timed("dinov3 +patches", bucket, batch,
                       lambda: (encoder.embed_cls(images), encoder.embed_patches(images)), plan.repeats)  # fmt: skip
        row.note = "patch_tokens=True (not in the projection)"
        report.rows.append(row)
    return rate


def bench_vae(plan: Plan, folder: Path, crops: list[Image.Image], report: Report) -> float | None:
    from photoset_dagster.models.flux_vae import FluxVaeSettings

    settings = FluxVaeSettings(model_id=str(folder), device=plan.device)
    sample = crops[: plan.precision_batch]
    encoder = precision(
        "vae", lambda dtype: FluxVaeSettings(model_id=str(folder), device=plan.device, dtype=dtype).load(),
        lambda model: model.encode(sample), len(sample), settings.compute_dtype, plan.repeats, report,
    )  # fmt: skip
    rows = []
    for batch in plan.vae_batches:
        images = cycled(crops, batch)
        rows.append(timed("vae", f"{plan.bucket[0]}x{plan.bucket[1]}", batch, lambda: encoder.encode(images),
                          plan.repeats)[0])  # fmt: skip
    rate = best(rows)
    report.rows.extend(rows)
    return rate


def bench_t5(plan: Plan, folder: Path, report: Report) -> float | None:
    from photoset_dagster.models.t5 import T5Settings

    settings = T5Settings(model_id=str(folder), device=plan.device)
    sample = [SAMPLE_CAPTION] * plan.precision_batch
    encoder = precision(
        "t5", lambda dtype: T5Settings(model_id=str(folder), device=plan.device, dtype=dtype).load(),
        lambda model: model.encode(sample)[0], len(sample), settings.compute_dtype, plan.repeats, report,
    )  # fmt: skip
    rows = []
    for batch in plan.t5_batches:  # tokenising is part of encode(): these rates include the CPU side
        captions = [SAMPLE_CAPTION] * batch
        rows.append(timed("t5", f"max_length {settings.max_length}", batch, lambda: encoder.encode(captions),
                          plan.repeats)[0])  # fmt: skip
    rate = best(rows)
    report.rows.extend(rows)
    return rate


def bench_captions(plan: Plan, workdir: Path, python: str, deadline: float, report: Report) -> float | None:
    """Images/s of Gemma 3 27B on vLLM at photoset's default in-flight depth, or None (a row says why)."""
    label = f"{plan.caption_tokens} tokens"
    why = None
    timeout = deadline - time.monotonic() - 15
    probe = [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
    if subprocess.run(probe, capture_output=True, timeout=60).returncode != 0:
        why = f"vllm is not importable by {python}"
    elif not _torch().cuda.is_available():
        why = "vLLM needs a CUDA device"
    elif timeout < 90:
        why = "no time left in the budget"
    if why is not None:
        report.rows.append(Row("captions (vLLM)", label, "-", note=f"skipped: {why}"))
        return None
    _free_memory()  # the child needs the GPU's memory
    levels = ",".join(map(str, plan.caption_in_flight))
    command = [python, __file__, "--vllm-child", "--workdir", str(workdir), "--in-flight", levels,
               "--caption-tokens", str(plan.caption_tokens)]  # fmt: skip
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        report.rows.append(Row("captions (vLLM)", label, "-", note=f"timed out after {timeout:.0f} s"))
        return None
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        report.rows.append(Row("captions (vLLM)", label, "-", note=f"failed: {tail}"[:200]))
        return None
    results = json.loads(lines[-1])
    rows = [
        Row("captions (vLLM)", label, f"{level} fly", result["images_per_s"],
            note=f"{result['tokens_per_s']:.0f} tokens/s; vLLM started in {results['start_s']:.0f} s")
        for level, result in zip(plan.caption_in_flight, results["levels"])
    ]  # fmt: skip
    report.rows.extend(rows)
    return rows[0].images_per_s  # photoset's default concurrency


def vllm_child(workdir: Path, in_flight: list[int], tokens: int) -> None:
    """In the child: Gemma 3 27B on vLLM with dummy weights; prints one JSON line of rates."""
    from transformers import Gemma3Config
    from vllm import LLM, SamplingParams

    from photoset_dagster.demo.tiny_models import build_gemma3_processor, gemma3_token_ids
    from photoset_dagster.models.captioner import CAPTION_PROMPT

    folder = workdir / "gemma3-27b-dummy"
    # Gemma's real geometry (896 px, 256 image tokens) with the tiny tokenizer, whose special-token ids
    # go into the config; generated ids are never detokenised, so the real vocabulary size stays.
    processor = build_gemma3_processor(image_size=896, image_seq_length=256)
    ids = gemma3_token_ids(processor.tokenizer)
    config = Gemma3Config(
        text_config={**GEMMA3_27B_TEXT, "pad_token_id": ids["pad_token_id"], "bos_token_id": ids["bos_token_id"]},
        vision_config=GEMMA3_27B_VISION, mm_tokens_per_image=256, boi_token_index=ids["boi_token_index"],
        eoi_token_index=ids["eoi_token_index"], image_token_index=ids["image_token_index"],
    )  # fmt: skip
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(folder)
    processor.save_pretrained(folder)

    started = time.perf_counter()
    llm = LLM(
        model=str(folder), load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=max(in_flight),
        gpu_memory_utilization=0.85, limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    start_s = time.perf_counter() - started
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (896, 896, 3), dtype=np.uint8)) for _ in range(max(in_flight))]
    requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate(requests[:4], params, use_tqdm=False)  # warm-up
    levels = []
    for level in in_flight:  # all the same length: exactly ``level`` decoding together throughout
        begun = time.perf_counter()
        outputs = llm.generate(requests[:level], params, use_tqdm=False)
        seconds = time.perf_counter() - begun
        generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        levels.append({"images_per_s": level / seconds, "tokens_per_s": generated / seconds})
    print(json.dumps({"start_s": start_s, "levels": levels}), flush=True)


# --- report ---------------------------------------------------------------------------------------


def print_rows(rows: list[Row], title: str) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = f"{'pass':<24} {'input':<18} {'batch':>7} {'img/s':>9} {'ms/batch':>9} {'peak GiB':>9}  note"
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(
            f"{row.name:<24} {row.input:<18} {row.batch!s:>7} {fmt(row.images_per_s, '.1f'):>9} "
            f"{fmt(row.ms_per_batch, '.0f'):>9} {fmt(row.peak_gib, '.2f'):>9}  {row.note}"
        )


def print_projection(stages: list[Stage], workers: int) -> None:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print(f"\nprojection: {GOAL_IMAGES:,} images, stages one after another, CPU on {workers} decode threads")
    print(f"{'stage':<10} {'GPU img/s':>10} {'CPU img/s':>10} {'img/s':>8} {'hours':>7}  note")
    known = 0.0
    for stage in stages:
        hours = GOAL_IMAGES / stage.rate / 3600 if stage.rate else None
        known += hours or 0.0
        shown = "-" if hours is None else f"{hours:.2f}"
        rates = f"{fmt(stage.gpu):>10} {fmt(stage.cpu):>10} {fmt(stage.rate):>8}"
        print(f"{stage.name:<10} {rates} {shown:>7}  {stage.note}")
    goal = f"goal <= {GOAL_HOURS:g} h, >= {GOAL_RATE:g} images/s sustained"
    missing = [stage.name for stage in stages if stage.rate is None]
    if not missing:
        sustained = GOAL_IMAGES / (known * 3600)
        met = known <= GOAL_HOURS and sustained >= GOAL_RATE
        print(f"projected end to end: {known:.2f} h, {sustained:.1f} images/s sustained ({goal}: "
              f"{'met' if met else 'NOT met'})")  # fmt: skip
        return
    left_s = GOAL_HOURS * 3600 - known * 3600
    need = f"{GOAL_IMAGES / left_s:.1f} images/s" if left_s > 0 else "more time than the goal has"
    print(f"projected end to end: >= {known:.2f} h without {', '.join(missing)} ({goal}); "
          f"{' and '.join(missing)} would need {need}")  # fmt: skip


def run(plan: Plan, workdir: Path, vllm_python: str) -> Report:
    from photoset_dagster.core.buckets import cover_crop
    from photoset_dagster.core.images import decode_image
    from photoset_dagster.stages.runner import DECODE_WORKERS

    deadline = time.monotonic() + plan.budget_s
    report = Report(workers=DECODE_WORKERS)
    print(f"... photos ({plan.photos} of {plan.photo_size[0]}x{plan.photo_size[1]})", flush=True)
    photo_paths = make_photos(workdir / "photos", plan)
    print("... CPU preparation", flush=True)
    cpu = bench_cpu(plan, photo_paths, report)
    print("... models", flush=True)
    folders = model_folders(plan, workdir)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        photos = list(pool.map(decode_image, photo_paths))
    crops = [cover_crop(image, plan.bucket) for image in photos]
    gpu: dict[str, float | None] = {}
    for name, measure in (
        ("dinov3", lambda: bench_dinov3(plan, folders.dinov3, photos, crops, report)),
        ("vae", lambda: bench_vae(plan, folders.flux, crops, report)),
        ("t5", lambda: bench_t5(plan, folders.t5, report)),
        ("captions", lambda: bench_captions(plan, workdir, vllm_python, deadline, report)),
    ):
        print(f"... {name}", flush=True)
        try:
            gpu[name] = measure()
        except Exception as exc:  # report and go on: one broken pass must not waste the GPU lease
            report.rows.append(Row(name, "-", "-", note=f"failed: {type(exc).__name__}: {exc}"[:300]))
            gpu[name] = None
        finally:
            _free_memory()
    captions_note = "vLLM, photoset's default in flight" if gpu["captions"] else "not measured"
    report.stages = [
        Stage("facts", None, cpu["facts"], "CPU only: decode, hash", on_gpu=False),
        Stage("captions", gpu["captions"], cpu["captions"], captions_note),
        Stage("dinov3", gpu["dinov3"], cpu["dinov3"]),
        Stage("vae", gpu["vae"], cpu["vae"]),
        Stage("t5", gpu["t5"], None, "text: tokenising is in the GPU rate"),
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="production sizes on one CUDA GPU")
    mode.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU")
    mode.add_argument("--vllm-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="where photos and models go (default: a temporary folder)")
    parser.add_argument("--vllm-python", default=sys.executable, help="an interpreter that can import vllm")
    parser.add_argument("--in-flight", default="", help=argparse.SUPPRESS)
    parser.add_argument("--caption-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.vllm_child:
        vllm_child(args.workdir, [int(level) for level in args.in_flight.split(",")], args.caption_tokens)
        return 0

    torch = _torch()
    if args.all and not torch.cuda.is_available():
        print("no CUDA device: --all measures a GPU (--smoke checks the script on the CPU)", file=sys.stderr)
        return 2
    plan = ALL if args.all else SMOKE
    device = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU"
    print(f"device: {device}; torch {torch.__version__}; plan: {plan.name}; {os.cpu_count()} CPU cores", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        report = run(plan, args.workdir or Path(temporary), args.vllm_python)

    print_rows(report.rows, f"{device}, {time.perf_counter() - started:.0f} s in all")
    print_projection(report.stages, report.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
