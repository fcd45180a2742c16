"""The model families, loaded from tiny real checkpoints through the production loaders."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from photoset_dagster.demo.tiny_models import TinyModels, build_tiny_models
from photoset_dagster.models.captioner import (
    CAPTION_PROMPT,
    CaptionError,
    CaptionSettings,
    normalise_caption,
)
from photoset_dagster.models.common import LOAD_COUNTS, ModelLoadError, resolve_device, resolve_dtype
from photoset_dagster.models.dinov3 import Dinov3Settings, Preprocessing
from photoset_dagster.models.flux_vae import FluxVaeSettings
from photoset_dagster.models.t5 import T5Settings
from photoset_dagster_tests.fixtures_models import CaptionServer, Reply, TinySettings


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- common ---------------------------------------------------------------------------------------


def test_device_and_dtype_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    # "auto" is the family's default, never the device's choice (the recipe records the result).
    assert resolve_dtype("auto", "bfloat16") == "bfloat16"
    assert resolve_dtype("float16", "float32") == "float16"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", "float32")


def test_each_family_has_an_explicit_compute_dtype() -> None:
    defaults = {
        Dinov3Settings: "float32", CaptionSettings: "bfloat16", FluxVaeSettings: "bfloat16", T5Settings: "float16"
    }
    for settings_class, dtype in defaults.items():
        settings = settings_class()
        assert settings.dtype == settings.compute_dtype == dtype
        assert settings_class(dtype="auto").compute_dtype == dtype
        assert settings_class(dtype="float32").torch_dtype() == torch.float32
        with pytest.raises(ValueError, match="dtype"):
            settings_class(dtype="fp16")  # refused when configured, not at the first batch


@pytest.mark.parametrize(
    ("settings_class", "env_var", "family"),
    [
        (Dinov3Settings, "PHOTOSET_DINOV3_MODEL", "dinov3"),
        (CaptionSettings, "PHOTOSET_CAPTION_MODEL", "captioner"),
        (FluxVaeSettings, "PHOTOSET_VAE_MODEL", "flux_vae"),
        (T5Settings, "PHOTOSET_T5_MODEL", "t5"),
    ],
)
def test_missing_local_model_names_the_setting(tmp_path, settings_class, env_var, family) -> None:
    missing = str(tmp_path / "no-such-model")
    before = LOAD_COUNTS[family]
    with pytest.raises(ModelLoadError) as error:
        settings_class(model_id=missing, device="cpu").load()
    assert env_var in str(error.value) and missing in str(error.value)
    assert LOAD_COUNTS[family] == before  # failed loads are not counted


def test_recipes_hold_what_changes_bytes_not_how_it_runs() -> None:
    for settings in (Dinov3Settings(), CaptionSettings(), FluxVaeSettings(), T5Settings()):
        moved = replace(settings, device="cuda:3", batch_size=64)
        assert moved.recipe().hash == settings.recipe().hash
        assert replace(settings, dtype="auto").recipe().hash == settings.recipe().hash  # auto is the default
        assert replace(settings, revision="abc123").recipe().hash != settings.recipe().hash
    assert Dinov3Settings(patch_tokens=True).recipe().hash != Dinov3Settings().recipe().hash
    assert Dinov3Settings().recipe().settings["cls_input"] == "full-image, processor default"
    assert CaptionSettings(prompt="Describe.").recipe().hash != CaptionSettings().recipe().hash
    assert CaptionSettings(backend="ollama").recipe().hash != CaptionSettings().recipe().hash  # another model
    assert CaptionSettings(backend="openai").recipe().hash == CaptionSettings().recipe().hash  # same model, served
    assert T5Settings(max_length=512).recipe().hash != T5Settings().recipe().hash
    # The sampling seed only matters when sampling; the pixel cap only for "original" inputs.
    assert FluxVaeSettings(seed=7).recipe().hash == FluxVaeSettings().recipe().hash
    assert FluxVaeSettings(latent="sample", seed=7).recipe().hash != FluxVaeSettings(latent="sample").recipe().hash
    assert FluxVaeSettings(max_pixels=1 << 20).recipe().hash == FluxVaeSettings().recipe().hash
    assert FluxVaeSettings(scaled=True).recipe().hash != FluxVaeSettings().recipe().hash


def test_the_resolved_compute_dtype_is_recipe() -> None:
    for settings in (Dinov3Settings(), FluxVaeSettings(), T5Settings()):
        recipe = settings.recipe()
        assert recipe.as_dict()["dtype"] == settings.compute_dtype
        other = next(name for name in ("float32", "bfloat16", "float16") if name != settings.compute_dtype)
        assert replace(settings, dtype=other).recipe().hash != recipe.hash
        # The same dtype on another device is the same recipe.
        assert replace(settings, device="cpu", dtype=settings.compute_dtype).recipe() == recipe
    # A caption's recipe is the model and its decoding; how it is served (and in what precision) is not.
    assert CaptionSettings(dtype="float32").recipe() == CaptionSettings().recipe()


def test_tiny_model_build_is_idempotent_and_deterministic(tiny_models: TinyModels, tmp_path) -> None:
    marker = tiny_models.dinov3.parent / ".tiny-models-built"
    stamp = marker.stat().st_mtime_ns
    assert build_tiny_models(tiny_models.dinov3.parent) == tiny_models
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A fresh T5 build (the one with a hand-made vocabulary) is byte-identical.
    from photoset_dagster.demo.tiny_models import _build_t5

    _build_t5(tmp_path / "t5")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "t5" / name).read_bytes() == (tiny_models.t5 / name).read_bytes()


# --- DINOv3 ---------------------------------------------------------------------------------------


def test_dinov3_cls_and_patches_match_the_model(tiny_settings: TinySettings) -> None:
    encoder = tiny_settings.dinov3.load()
    images = [_noise(64, 48, 1), _noise(64, 48, 2)]
    model = encoder.model

    cls = encoder.embed_cls(images)
    assert cls.shape == (2, 1024) and cls.dtype == np.float32
    with torch.inference_mode():
        reference = model(pixel_values=encoder.pixel_values(images))
    np.testing.assert_allclose(cls, reference.pooler_output.numpy(), rtol=1e-5, atol=1e-5)

    patches = encoder.embed_patches(images)
    assert encoder.num_register_tokens == 4
    assert patches.shape == (2, (64 // 16) * (48 // 16), 1024) and patches.dtype == np.float32
    pixels = encoder.processor(
        images=images, size={"height": 48, "width": 64}, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    assert pixels.shape[-2:] == (48, 64)
    with torch.inference_mode():
        hidden = model(pixel_values=pixels).last_hidden_state
    np.testing.assert_allclose(patches, hidden[:, 1 + 4 :].numpy(), rtol=1e-4, atol=1e-4)
    # Not the seed's slice, which kept the 4 registers and dropped the last 4 patches (bug B1).
    assert not np.allclose(patches, hidden[:, 1:-4].numpy(), atol=1e-2)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth content, like a photo (noise would make every resampling difference look large)."""
    small = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def test_dinov3_preprocessing_on_the_device_matches_the_processor(tiny_settings: TinySettings) -> None:
    encoder = tiny_settings.dinov3.load()
    # Shrunk (a photo), enlarged, and a noisy one, in one batch of mixed sizes.
    images = [_photo(1600, 1200, 1), _photo(96, 160, 2), _noise(300, 280, 3)]
    ours = encoder.pixel_values(images).numpy()
    expected = encoder.processor(images=images, return_tensors="pt")["pixel_values"].numpy()
    assert ours.shape == expected.shape == (3, 3, 224, 224)
    # The PIL processor rounds its resized pixels to 8 bits; ours stay float: at most one level apart.
    level = encoder.preprocessing.rescale_factor / min(encoder.preprocessing.std)
    difference = np.abs(ours - expected)
    assert difference.max() <= 1.01 * level and difference.mean() < 0.35 * level


def test_dinov3_preprocessing_matches_the_torchvision_processor(tiny_settings: TinySettings) -> None:
    pytest.importorskip("torchvision")  # the processor DINOv3 ships with needs it; a GPU install may have it
    from transformers import DINOv3ViTImageProcessor

    encoder = tiny_settings.dinov3.load()
    images = [_photo(1600, 1200, 1), _photo(96, 160, 2)]
    expected = DINOv3ViTImageProcessor.from_pretrained(str(tiny_settings.dinov3.model_id))(
        images=images, return_tensors="pt"
    )["pixel_values"]
    np.testing.assert_allclose(encoder.pixel_values(images).numpy(), expected.numpy(), atol=1e-4)


def test_dinov3_preprocessing_refuses_steps_it_does_not_reproduce() -> None:
    from transformers import ViTImageProcessorPil

    settings = {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert Preprocessing.of(ViTImageProcessorPil(resample=3, **settings)).resample == "bicubic"
    with pytest.raises(ValueError, match="resample"):
        Preprocessing.of(ViTImageProcessorPil(resample=0, **settings))  # nearest
    with pytest.raises(ValueError, match="fixed size"):
        Preprocessing.of(ViTImageProcessorPil(do_resize=False, **settings))


def test_dinov3_patches_refuse_mixed_or_unaligned_sizes(tiny_settings: TinySettings) -> None:
    encoder = tiny_settings.dinov3.load()
    with pytest.raises(ValueError, match="one size"):
        encoder.embed_patches([_noise(64, 48, 1), _noise(48, 64, 2)])
    with pytest.raises(ValueError, match="multiple"):
        encoder.embed_patches([_noise(70, 48, 1)])


# --- captioner ------------------------------------------------------------------------------------


def test_prompt_is_the_seeds_verbatim() -> None:
    assert CAPTION_PROMPT.startswith("Generate a single, dense paragraph describing this image")
    assert "(including specific body build, muscle definition, skin texture" in CAPTION_PROMPT
    assert CAPTION_PROMPT.endswith("or meta-commentary. Start the description immediately.")
    assert "  " not in CAPTION_PROMPT


def test_normalise_caption() -> None:
    assert normalise_caption("model\nA man.\r\n\r\n  Standing   tall.\rOutdoors. ") == "A man. Standing tall. Outdoors."
    assert normalise_caption("  \n\n\t ") == ""
    assert normalise_caption("The model\nstands.") == "The model stands."


def test_transformers_captioner_with_tiny_gemma(tiny_settings: TinySettings) -> None:
    # A short prompt: behind the full one, a 2-layer random model's image signal fades away.
    settings = replace(tiny_settings.caption, prompt="Describe only what is visible: subject, pose, lighting.")
    captioner = settings.load()
    images = [_noise(80, 60, 1), Image.new("RGB", (40, 90), (250, 250, 250)), Image.new("RGB", (40, 90), (250, 0, 0))]
    captions = captioner.caption(images)
    assert all(isinstance(caption, str) and caption for caption in captions)
    assert captions == [normalise_caption(caption) for caption in captions]
    assert len(set(captions)) == 3  # the image reaches the model (its projector is not left at zero)
    assert captioner.caption(images) == captions  # greedy decoding is repeatable
    # A caption does not depend on which images share its batch.
    assert captioner.caption(images[1:]) == captions[1:]


def test_transformers_captioner_lets_a_failed_batch_raise(
    tiny_settings: TinySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails (here: out of memory beyond one image) raises instead of failing every image,
    so the runner's one-by-one retry captions each image alone."""
    captioner = tiny_settings.caption.load()
    generate = captioner.model.generate

    def generate_one_at_a_time(**inputs):
        if inputs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(**inputs)

    monkeypatch.setattr(captioner.model, "generate", generate_one_at_a_time)
    images = [_noise(80, 60, 1), _noise(60, 80, 2)]
    with pytest.raises(torch.OutOfMemoryError):
        captioner.caption(images)
    alone = [captioner.caption([image]) for image in images]
    assert all(len(result) == 1 and isinstance(result[0], str) and result[0] for result in alone)
    stats = captioner.stats()
    assert (stats["backend"], stats["requests"], stats["images"], stats["failed"]) == ("transformers", 3, 2, 0)
    assert stats["completion_tokens"] > 0 and stats["max_in_flight"] == 2


def _http_settings(server: CaptionServer, backend: str, **overrides: object) -> CaptionSettings:
    values: dict[str, object] = {
        "backend": backend,
        "ollama_host": server.url,
        "openai_base_url": server.url + "/v1",
        "openai_api_key": "secret-key",
        "max_new_tokens": 77,
        "retry_backoff_s": 0.01,
        "timeout_s": 5.0,
    }
    return CaptionSettings(**{**values, **overrides})  # type: ignore[arg-type]


def test_ollama_backend_request_and_caption(caption_server: CaptionServer) -> None:
    caption_server.queue(Reply(body={"response": "model\nA red square.\n\n", "done": True}))
    result = _http_settings(caption_server, "ollama").load().caption([Image.new("RGB", (32, 16), (255, 0, 0))])
    assert result == ["A red square."]
    request = caption_server.requests[0]
    assert request.path == "/api/generate"
    body = request.body
    assert (body["model"], body["prompt"], body["stream"]) == ("gemma3:27b", CAPTION_PROMPT, False)
    assert body["options"] == {"temperature": 0.0, "num_predict": 77}
    sent = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert (sent.format, sent.size) == ("JPEG", (32, 16))


def test_openai_backend_request_and_caption(caption_server: CaptionServer) -> None:
    caption_server.queue(Reply(body={"choices": [{"message": {"role": "assistant", "content": "A blue disc."}}]}))
    result = _http_settings(caption_server, "openai").load().caption([Image.new("RGB", (16, 16), (0, 0, 255))])
    assert result == ["A blue disc."]
    request = caption_server.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer secret-key"
    body = request.body
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("google/gemma-3-27b-it", 77, 0.0)
    (message,) = body["messages"]
    text, image = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": CAPTION_PROMPT}
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_http_retries_transient_errors_then_succeeds(caption_server: CaptionServer) -> None:
    caption_server.queue(
        Reply(503, {"error": "loading"}),
        Reply(429, {"error": "busy"}, headers={"Retry-After": "0"}),
        Reply(body={"response": "A cat."}),
    )
    result = _http_settings(caption_server, "ollama", retries=2).load().caption([_noise(16, 16, 0)])
    assert result == ["A cat."] and len(caption_server.requests) == 3


def test_http_errors_become_caption_errors_with_reasons(caption_server: CaptionServer) -> None:
    captioner = _http_settings(caption_server, "ollama", retries=1, concurrency=1).load()
    image = [_noise(16, 16, 0)]

    caption_server.queue(Reply(400, {"error": "model 'gemma3:27b' not found"}))
    (not_found,) = captioner.caption(image)
    assert isinstance(not_found, CaptionError) and "HTTP 400" in str(not_found) and "not found" in str(not_found)
    assert len(caption_server.requests) == 1  # not retryable

    caption_server.queue(Reply(500, "boom"), Reply(502, "boom"))
    (gave_up,) = captioner.caption(image)
    assert isinstance(gave_up, CaptionError) and "HTTP 502" in str(gave_up) and "2 attempt(s)" in str(gave_up)
    assert len(caption_server.requests) == 3

    caption_server.queue(Reply(body={"response": " \n\r\n "}))
    (empty,) = captioner.caption(image)
    assert isinstance(empty, CaptionError) and "empty caption" in str(empty)

    caption_server.queue(Reply(body={"done": True}))
    (malformed,) = captioner.caption(image)
    assert isinstance(malformed, CaptionError) and "no response field" in str(malformed)


def test_openai_null_content_is_an_error_not_empty_string(caption_server: CaptionServer) -> None:
    caption_server.queue(Reply(body={"choices": [{"message": {"content": None}}]}), Reply(body={"choices": []}))
    captioner = _http_settings(caption_server, "openai", concurrency=1).load()
    results = captioner.caption([_noise(16, 16, 0), _noise(16, 16, 1)])
    assert all(isinstance(result, CaptionError) for result in results)
    # Images are encoded ahead in threads, so which request meets which queued reply may vary.
    reasons = sorted(str(result) for result in results)
    assert "not text" in reasons[0] and "malformed" in reasons[1], reasons  # ("caption is not text" sorts first)


def test_http_timeout_is_a_caption_error(caption_server: CaptionServer) -> None:
    caption_server.queue(Reply(body={"response": "too late"}, delay_s=1.0))
    captioner = _http_settings(caption_server, "ollama", retries=0, timeout_s=0.2).load()
    (result,) = captioner.caption([_noise(16, 16, 0)])
    assert isinstance(result, CaptionError) and "timed out" in str(result)


def test_http_requests_run_concurrently_and_keep_order(caption_server: CaptionServer) -> None:
    def echo_size(request) -> Reply:
        size = Image.open(io.BytesIO(base64.b64decode(request.body["images"][0]))).size
        return Reply(body={"response": f"{size[0]} wide"}, delay_s=0.2)

    caption_server.default = echo_size
    images = [Image.new("RGB", (16 * (i + 1), 16)) for i in range(4)]
    started = time.perf_counter()
    result = _http_settings(caption_server, "ollama", concurrency=4).load().caption(images)
    assert result == ["16 wide", "32 wide", "48 wide", "64 wide"]
    assert caption_server.max_in_flight >= 2
    assert time.perf_counter() - started < 0.8  # four 0.2 s requests, not one after another


# --- Flux VAE -------------------------------------------------------------------------------------


def test_vae_latents_shape_dtype_and_scaling(tiny_settings: TinySettings) -> None:
    images = [_noise(64, 32, 1), _noise(64, 32, 2)]
    raw = tiny_settings.vae.load().encode(images)
    assert raw.shape == (2, 16, 4, 8) and raw.dtype == np.float16
    np.testing.assert_array_equal(raw, tiny_settings.vae.load().encode(images))  # "mode" is deterministic

    scaled_encoder = replace(tiny_settings.vae, scaled=True).load()
    scaled = scaled_encoder.encode(images)
    assert (scaled_encoder.scaling_factor, scaled_encoder.shift_factor) == (0.3611, 0.1159)
    np.testing.assert_allclose(scaled, (raw.astype(np.float32) - 0.1159) * 0.3611, atol=2e-3)


def test_vae_sampling_is_seeded_per_image_not_per_batch(tiny_settings: TinySettings) -> None:
    encoder = replace(tiny_settings.vae, latent="sample", seed=3).load()
    a, b = _noise(32, 32, 1), _noise(32, 32, 2)
    together = encoder.encode([a, b], image_ids=["a", "b"])
    np.testing.assert_array_equal(together, encoder.encode([a, b], image_ids=["a", "b"]))
    alone = encoder.encode([b], image_ids=["b"])
    # Same noise alone or in a batch; only the convolutions' batched rounding differs.
    np.testing.assert_allclose(together[1], alone[0], atol=1e-3)
    mode = replace(tiny_settings.vae, latent="mode").load().encode([b])
    assert not np.array_equal(alone[0], mode[0])
    other_seed = replace(tiny_settings.vae, latent="sample", seed=4).load().encode([b], image_ids=["b"])
    assert not np.array_equal(alone[0], other_seed[0])
    with pytest.raises(ValueError, match="image id"):
        encoder.encode([a])


def test_vae_refuses_sizes_flux_cannot_pack(tiny_settings: TinySettings) -> None:
    encoder = tiny_settings.vae.load()
    with pytest.raises(ValueError, match="multiple of 16"):
        encoder.encode([_noise(72, 32, 1)])
    with pytest.raises(ValueError, match="one size"):
        encoder.encode([_noise(32, 32, 1), _noise(64, 32, 1)])


# --- T5 -------------------------------------------------------------------------------------------


def test_t5_hidden_states_and_mask(tiny_settings: TinySettings) -> None:
    encoder = tiny_settings.t5.load()
    assert type(encoder.model).__name__ == "T5EncoderModel"  # never the encoder-decoder AutoModel gives
    captions = ["a photo of a person standing", "light " * 200]
    hidden, mask = encoder.encode(captions)
    assert hidden.shape == (2, 77, 1024) and hidden.dtype == np.float16
    reference = encoder.tokenizer(captions, padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(mask, np.array(reference["attention_mask"], dtype=np.uint8))
    assert mask.dtype == np.uint8 and mask[0].sum() < 77 and mask[1].sum() == 77
    assert reference["input_ids"][1][-1] == encoder.tokenizer.eos_token_id  # truncated rows still end in EOS
    with torch.inference_mode():
        expected = encoder.model(
            input_ids=torch.tensor(reference["input_ids"]), attention_mask=torch.tensor(reference["attention_mask"])
        ).last_hidden_state
    np.testing.assert_array_equal(hidden, expected.half().numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_t5_computes_in_half_precision(tiny_settings: TinySettings, dtype: str) -> None:
    captions = ["a photo of a person standing", "light " * 200]
    reference, mask = tiny_settings.t5.load().encode(captions)
    half = replace(tiny_settings.t5, dtype=dtype).load()
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    hidden, half_mask = half.encode(captions)
    assert np.isfinite(hidden).all() and np.array_equal(mask, half_mask)
    # Measured on this tiny model: float16 within 0.004 of float32, bfloat16 within 0.03.
    tolerance = {"float16": 0.01, "bfloat16": 0.05}[dtype]
    np.testing.assert_allclose(hidden.astype(np.float32), reference.astype(np.float32), atol=tolerance)
