"""The streaming HTTP captioner against the loopback continuous-batching server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from photoset_dagster.demo.caption_server import ChatRequest, ContinuousBatchingServer, EngineModel, Scripted
from photoset_dagster.models.captioner import ENCODE_AHEAD, CaptionError, CaptionSettings, jpeg_base64
from photoset_dagster_tests.fixtures_dagster import build_defs, materialize_range

KEY = "sk-test-5f2e9c0d"
# Short captions at 200 tokens/s alone: a request takes ~50 ms, so a test of dozens takes well under a second.
FAST = EngineModel(ceiling_tokens_per_s=5000, step_s=0.005, step_growth_s=0.00005, prefill_s=0.01, min_tokens=5,
                   max_tokens=15)  # fmt: skip


def _images(count: int) -> list[tuple[int, Image.Image]]:
    """Keyed images whose width (16 + key) tells a script which one a request carries."""
    return [(key, Image.new("RGB", (16 + key, 16), (key * 3 % 256, 90, 160))) for key in range(count)]


def _key(request: ChatRequest) -> int:
    return request.image_size()[0] - 16


def _settings(server: ContinuousBatchingServer, **overrides: object) -> CaptionSettings:
    values: dict[str, object] = {
        "backend": "openai",
        "openai_base_url": server.url,
        "openai_api_key": KEY,
        "retry_backoff_s": 0.01,
        "timeout_s": 10.0,
        **overrides,
    }
    return CaptionSettings(**values)  # type: ignore[arg-type]


def test_stream_keeps_the_configured_number_of_requests_in_flight() -> None:
    with ContinuousBatchingServer(FAST, api_key=KEY) as server:
        captioner = _settings(server, concurrency=16).load()
        results = list(captioner.caption_stream(_images(80)))
        served = server.stats()

    assert sorted(key for key, _ in results) == list(range(80))  # every image exactly once
    assert all(isinstance(caption, str) and caption for _, caption in results)
    stats = captioner.stats()
    assert stats["max_in_flight"] == 16  # never more, and reached
    # The server may see one fewer at its busiest: a reply can leave before the next request arrives.
    assert 12 <= served.max_running <= 16
    assert stats["mean_in_flight"] > 12  # held there, not one batch barrier after another
    assert (stats["requests"], stats["images"], stats["failed"], stats["retries"]) == (80, 80, 0, 0)
    assert stats["completion_tokens"] == served.completion_tokens > 0  # from usage.completion_tokens
    assert stats["tokens_per_s"] > 0 and stats["images_per_s"] > 0 and stats["wall_s"] > 0


def test_results_come_in_completion_order() -> None:
    def first_is_long(request: ChatRequest) -> Scripted | None:
        return Scripted(tokens=120) if _key(request) == 0 else None

    with ContinuousBatchingServer(FAST, script=first_is_long) as server:
        order = [key for key, _ in _settings(server, concurrency=8).load().caption_stream(_images(12))]
    assert order[-1] == 0 and sorted(order) == list(range(12))


def test_items_are_pulled_lazily_and_never_far_ahead() -> None:
    pulled = 0

    def source() -> Iterator[tuple[int, Image.Image]]:
        nonlocal pulled
        for item in _images(30):
            pulled += 1
            yield item

    with ContinuousBatchingServer(FAST) as server:
        ahead = []
        for yielded, _ in enumerate(_settings(server, concurrency=4).load().caption_stream(source()), start=1):
            ahead.append(pulled - yielded)
    assert max(ahead) <= 4 + ENCODE_AHEAD  # bounded memory: at most this many images held
    assert pulled == 30


def test_a_503_with_retry_after_is_retried_when_the_server_asks() -> None:
    arrivals: dict[int, float] = {}

    def busy_once(request: ChatRequest) -> Scripted | None:
        if _key(request) != 1:
            return None
        arrivals[request.attempt] = time.perf_counter()
        return Scripted(503, headers={"Retry-After": "1"}) if request.attempt == 1 else None

    with ContinuousBatchingServer(FAST, script=busy_once) as server:
        captioner = _settings(server, concurrency=4, retries=2).load()
        results = dict(captioner.caption_stream(_images(6)))
    assert all(isinstance(caption, str) for caption in results.values())
    assert sorted(arrivals) == [1, 2]
    assert arrivals[2] - arrivals[1] >= 0.95  # Retry-After, not the 0.01 s backoff
    assert captioner.stats()["retries"] == 1


def test_a_request_that_fails_for_good_fails_only_its_image() -> None:
    attempts = []

    def refuse_two(request: ChatRequest) -> Scripted | None:
        if _key(request) == 2:
            attempts.append(request.attempt)
            return Scripted(400, body={"error": {"message": "image could not be processed"}})
        return None

    with ContinuousBatchingServer(FAST, script=refuse_two) as server:
        captioner = _settings(server, concurrency=4, retries=3).load()
        results = dict(captioner.caption_stream(_images(8)))
    failed = results.pop(2)
    assert isinstance(failed, CaptionError) and "HTTP 400" in str(failed) and "could not be processed" in str(failed)
    assert attempts == [1]  # final: not retried
    assert len(results) == 7 and all(isinstance(caption, str) for caption in results.values())
    assert captioner.stats()["failed"] == 1


def test_the_api_key_never_appears_in_errors_or_stats() -> None:
    def echo_the_key(request: ChatRequest) -> Scripted | None:
        # Some servers quote the key they refused ("Incorrect API key provided: sk-...").
        if _key(request) == 0:
            return Scripted(401, body={"error": {"message": f"refused {request.headers['authorization']}"}})
        return None

    with ContinuousBatchingServer(FAST, api_key=KEY, script=echo_the_key) as server:
        settings = _settings(server, concurrency=2)
        captioner = settings.load()
        results = dict(captioner.caption_stream(_images(3)))
    refused = results[0]
    assert isinstance(refused, CaptionError) and "HTTP 401" in str(refused) and "[api key]" in str(refused)
    assert isinstance(results[1], str)  # the server checked the key and accepted it
    for text in (str(refused), repr(refused), json.dumps(captioner.stats()), repr(settings)):
        assert KEY not in text


def test_leaving_a_stream_early_stops_pulling_and_the_captioner_still_works() -> None:
    pulled = 0

    def source() -> Iterator[tuple[int, Image.Image]]:
        nonlocal pulled
        for item in _images(200):
            pulled += 1
            yield item

    with ContinuousBatchingServer(FAST) as server:
        captioner = _settings(server, concurrency=4).load()
        stream = captioner.caption_stream(source())
        first = [next(stream) for _ in range(3)]
        stream.close()
        pulled_at_close = pulled
        time.sleep(0.2)
        again = captioner.caption([image for _, image in _images(3)])
    assert len(first) == 3 and pulled_at_close <= 3 + 4 + ENCODE_AHEAD and pulled == pulled_at_close
    assert all(isinstance(caption, str) for caption in again)


def test_caption_keeps_input_order_over_the_stream() -> None:
    with ContinuousBatchingServer(FAST) as server:
        images = [image for _, image in _images(6)]
        captions = _settings(server, concurrency=3).load().caption(images)
        alone = [_settings(server, concurrency=1).load().caption([image])[0] for image in images]
    assert captions == alone  # the caption depends on the image only, and each lands in its place


# --- the server itself ----------------------------------------------------------------------------


def test_engine_latency_grows_slowly_until_the_ceiling_binds() -> None:
    model = EngineModel(ceiling_tokens_per_s=2000, step_s=0.02, step_growth_s=0.0001)
    assert model.step_time(1) == pytest.approx(0.0201)
    assert model.step_time(32) < 1.2 * model.step_time(1)  # 32 at once: each barely slower
    assert 64 / model.step_time(64) == pytest.approx(2000)  # 64 together: at the ceiling
    assert 256 / model.step_time(256) == pytest.approx(2000)  # never above it
    assert 4 / model.step_time(4) < 0.1 * 2000  # four in flight reach a tenth of it


def test_server_shares_its_token_ceiling_across_requests() -> None:
    model = EngineModel(ceiling_tokens_per_s=600, step_s=0.005, step_growth_s=0.0, prefill_s=0.0, min_tokens=10,
                        max_tokens=10)  # fmt: skip

    async def latencies(url: str, count: int) -> list[float]:
        """Seconds each of ``count`` requests sent at once takes (a light asyncio client, not photoset's)."""

        async def one(client: httpx.AsyncClient, image: Image.Image) -> float:
            started = time.perf_counter()
            part = {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg_base64(image)}"}}
            response = await client.post(url + "/chat/completions", json={"messages": [{"content": [part]}]})
            assert response.json()["usage"]["completion_tokens"] == 10
            return time.perf_counter() - started

        async with httpx.AsyncClient(timeout=10) as client:
            return list(await asyncio.gather(*(one(client, image) for _, image in _images(count))))

    with ContinuousBatchingServer(model) as server:
        together = asyncio.run(latencies(server.url, 32))
        served = server.stats()
        alone = asyncio.run(latencies(server.url, 1))
    # Alone, 10 tokens take 50 ms; 32 at once share 600 tokens/s, so each takes at least 32 * 10 / 600 s.
    assert min(together) >= 0.5 and alone[0] < 0.25
    assert served.max_running == 32 and served.completion_tokens == 320
    assert served.tokens_per_s <= 1.01 * 600


def test_a_run_reports_the_rate_and_the_in_flight_depth_it_reached(photoset_env, photo_site, instance) -> None:
    ids = photo_site.add_images(6)
    photo_site.publish(ids)
    with ContinuousBatchingServer(FAST) as server:
        env = {**photoset_env, "PHOTOSET_CAPTION_BACKEND": "openai", "PHOTOSET_OPENAI_BASE_URL": server.url,
               "PHOTOSET_CAPTION_CONCURRENCY": "4"}
        defs = build_defs(env)
        assert defs.resolve_job_def("refresh_photo_list_job").execute_in_process(instance=instance).success
        result = materialize_range(defs, instance, ["approved_links", "image_facts", "captions"], ids[0], ids[-1])

    assert result.success
    (figures,) = [o.metadata for o in result.asset_observations_for_node("image_pipeline")
                  if o.asset_key.to_user_string() == "captions"]
    assert figures["run_done"].value == len(ids)
    assert figures["run_tokens_per_s"].value > 0
    assert 1 <= figures["run_max_in_flight"].value <= 4
