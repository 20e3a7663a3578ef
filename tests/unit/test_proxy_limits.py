"""Request and image limits (proxy/request/limits.py), their flags, the API key file, the mapping of
model errors to statuses and the shutdown drain: pure logic, no server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import pytest
from helpers import data_url
from hostile_samples import (
    ANIMATED_GIF,
    BOMB_PNG,
    CMYK_JPEG,
    CORRUPT_JPEG,
    GOOD_JPEG,
    GOOD_PNG,
    NOT_AN_IMAGE,
    ONE_BY_10000,
    ONE_BY_ONE,
    OVER_40MP_PNG,
    PNG_16BIT,
    TRUNCATED_HEADER_PNG,
    TRUNCATED_JPEG,
    WEBP,
    png_header_only,
)
from tritonclient.utils import InferenceServerException

from proxy.config import parse_config
from proxy.errors import APIError
from proxy.media.images import IMAGE, ImageHeader, _safe_header, check_images, read_image_header
from proxy.media.kinds import MediaRef
from proxy.request.limits import RequestLimits, check_chat, check_json_text, check_media
from proxy.request.schema import parse_chat_request
from proxy.serving.admission import Admission, AdmissionSettings
from proxy.serving.auth import APIKeyError, read_api_key
from proxy.serving.shutdown import Drain
from proxy.transport.backend import model_error
from proxy.transport.contract import ModelError, ModelLimits

# In the proxy process proxy/media/images.py makes this warning an error; pytest resets filters.
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
PARAM = "messages[0].content[0].image_url"
LEAK = re.compile(r"PIL|Traceback|\b0x[0-9a-fA-F]{6,}|/\w+/|BytesIO")


def chat(*contents, **fields):
    return parse_chat_request(
        {"messages": [{"role": "user", "content": c} for c in contents], **fields}
    )


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def refused(call) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    return caught.value


def limits_of(**flags) -> RequestLimits:
    """Request limits as the proxy applies them: its flags over the model's defaults."""
    return RequestLimits(**flags).within(ModelLimits())


async def check_one(data: bytes, limits: RequestLimits | None = None) -> None:
    await check_media([data], [MediaRef(IMAGE, "data:", PARAM)], limits or limits_of())


# ---- counts before decoding ----------------------------------------------------------------


def test_message_count_limit():
    assert refused(lambda: check_chat(chat("a", "b", "c"), limits_of(max_messages=2))).code == (
        "too_many_messages"
    )
    check_chat(chat("a", "b"), limits_of(max_messages=2))


def test_text_limit_counts_all_messages_and_names_where_it_was_crossed():
    limits = limits_of(max_text_chars=10)
    check_chat(chat("12345", [{"type": "text", "text": "12345"}]), limits)
    error = refused(lambda: check_chat(chat("12345", [{"type": "text", "text": "123456"}]), limits))
    assert (error.status, error.code, error.param) == (
        400,
        "text_too_long",
        "messages[1].content[0]",
    )


def test_image_count_limit_names_the_first_image_over_it():
    parts = [image_part(data_url(GOOD_PNG))] * 3
    error = refused(lambda: check_chat(chat(parts), limits_of(max_images=2)))
    assert (error.code, error.param) == ("too_many_images", "messages[0].content[2].image_url")


def test_inline_image_too_large_is_refused_from_its_base64_length_before_decoding():
    url = "data:image/png;base64," + "A" * 4000  # 3000 bytes once decoded
    error = refused(lambda: check_chat(chat([image_part(url)]), limits_of(max_image_bytes=1000)))
    assert (error.code, error.param) == ("image_too_large", PARAM)
    check_chat(chat([image_part(url)]), limits_of(max_image_bytes=3000))


def test_lone_surrogates_are_refused_but_escaped_pairs_are_fine():
    raw = b'{"messages": [{"role": "user", "content": "\\ud800x"}]}'
    error = refused(lambda: check_json_text(raw, json.loads(raw)))
    assert (error.code, error.param) == ("invalid_unicode", "messages[0].content")
    pair = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    check_json_text(pair, json.loads(pair))


# ---- image headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, size",
    [
        (GOOD_PNG, (32, 24)),
        (GOOD_JPEG, (32, 24)),
        (CMYK_JPEG, (16, 16)),
        (PNG_16BIT, (16, 16)),
        (ANIMATED_GIF, (12, 12)),
        (WEBP, (20, 10)),
        (ONE_BY_ONE, (1, 1)),
        (OVER_40MP_PNG, (8000, 6000)),
    ],
)
def test_header_gives_the_size_without_decoding(data, size):
    header = read_image_header(data)
    assert header is not None and (header.width, header.height) == size


@pytest.mark.parametrize(
    "data",
    [GOOD_PNG, GOOD_JPEG, CMYK_JPEG, PNG_16BIT, ANIMATED_GIF, WEBP, ONE_BY_ONE],
)
async def test_ordinary_and_unusual_images_pass(data):
    await check_one(data)


@pytest.mark.parametrize(
    "data, code",
    [
        (BOMB_PNG, "image_too_large"),  # Pillow's DecompressionBombError, from the header
        (png_header_only(10_000, 10_000), "image_too_large"),  # Pillow warns: an error here
        (OVER_40MP_PNG, "image_too_large"),  # under Pillow's threshold, over ours
        (ONE_BY_10000, "image_aspect_ratio_too_large"),
        (TRUNCATED_HEADER_PNG, "invalid_image"),
        (TRUNCATED_JPEG, "invalid_image"),
        (CORRUPT_JPEG, "invalid_image"),
        (NOT_AN_IMAGE, "invalid_image"),
        (png_header_only(0, 5), "invalid_image"),
    ],
)
async def test_hostile_images_are_refused_from_the_header(data, code):
    with pytest.raises(APIError) as caught:
        await check_one(data)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, PARAM)
    assert not LEAK.search(caught.value.message)


# pytest resets warning filters per test; in the proxy process proxy/request/limits.py sets this one.
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_warning_is_an_error():
    assert _safe_header(png_header_only(10_000, 10_000)) == "bomb"  # 100 MP: Pillow warns
    assert _safe_header(BOMB_PNG) == "bomb"  # 10 GP: Pillow raises


async def test_min_side_bytes_and_aspect_limits_are_configurable():
    with pytest.raises(APIError) as caught:
        await check_one(ONE_BY_ONE, limits_of(min_image_side=2))
    assert caught.value.code == "image_too_small"
    with pytest.raises(APIError) as caught:
        await check_one(GOOD_PNG, limits_of(max_image_bytes=len(GOOD_PNG) - 1))
    assert caught.value.code == "image_too_large"
    elongated = png_header_only(1, 300)
    with pytest.raises(APIError) as caught:  # a flag cannot allow more than the model's 200:1
        await check_one(elongated, limits_of(max_image_aspect_ratio=300))
    assert caught.value.code == "image_aspect_ratio_too_large"
    lax_model = ModelLimits(max_aspect_ratio=400)
    await check_one(elongated, RequestLimits(max_image_aspect_ratio=300).within(lax_model))


async def test_request_pixels_add_up_across_images():
    limits = limits_of(max_request_pixels=32 * 24 * 2)
    refs = [MediaRef(IMAGE, "data:", f"messages[0].content[{i}].image_url") for i in range(3)]
    await check_images([GOOD_PNG] * 2, refs[:2], limits)
    with pytest.raises(APIError) as caught:
        await check_images([GOOD_PNG] * 3, refs, limits)
    assert (caught.value.code, caught.value.param) == ("too_many_pixels", refs[2].param)


def test_image_header_pixels():
    assert ImageHeader("png", 3, 4).pixels == 12


# ---- flags ---------------------------------------------------------------------------------


def test_hardening_flags_have_env_fallbacks_and_flags_win(monkeypatch):
    monkeypatch.setenv("PROXY_MAX_IMAGES", "4")
    monkeypatch.setenv("PROXY_MAX_CONCURRENT_REQUESTS", "3")
    monkeypatch.setenv("PROXY_REQUEST_TIMEOUT_S", "9.5")
    config = parse_config(["--max-images", "5", "--min-image-side", "7"])
    assert (config.limits.max_images, config.admission.max_concurrent_requests) == (5, 3)
    assert (config.admission.request_timeout_s, config.limits.min_image_side) == (9.5, 7)


def test_limits_the_model_has_default_to_the_models_and_flags_only_narrow_them():
    config = parse_config([])
    assert config.limits.within(ModelLimits()) == dataclasses.replace(
        config.limits,
        max_images=16,
        max_image_source_pixels=40_000_000,
        max_image_aspect_ratio=200,
        max_videos=2,
        max_tools=64,
        max_schema_bytes=32 * 1024,
        max_schema_depth=16,
    )
    assert config.limits.within(ModelLimits(max_images=32)).max_images == 32  # QWEN_VL_MAX_IMAGES
    narrowed = parse_config(["--max-images", "4", "--max-image-aspect-ratio", "300"]).limits
    assert narrowed.within(ModelLimits(max_images=32)).max_images == 4
    tools = parse_config(["--max-tools", "8", "--max-schema-depth", "40"]).limits
    assert tools.within(ModelLimits()).max_tools == 8  # a flag narrows the model's 64
    assert tools.within(ModelLimits()).max_schema_depth == 16  # and never widens it
    assert narrowed.within(ModelLimits()).max_image_aspect_ratio == 200  # never laxer
    assert config.server.shutdown_timeout_s == 30  # tritonserver --exit-timeout-secs in stack.py
    assert config.server.api_key == ""


@pytest.mark.parametrize(
    "argv",
    [["--max-images", "-1"], ["--max-image-aspect-ratio", "0.5"], ["--request-timeout-s", "-1"]],
)
def test_bad_limit_values_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_config(argv)


def test_api_key_from_flag_env_or_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    assert parse_config(["--api-key-file", str(key_file)]).server.api_key == "s3cret-from-file"
    monkeypatch.setenv("PROXY_API_KEY", "from-env")
    assert parse_config([]).server.api_key == "from-env"
    assert "from-env" not in repr(parse_config([]))  # the config may be logged


def test_api_key_problems_are_startup_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for key, key_file in (("", str(empty)), ("", str(tmp_path / "missing")), ("a\x00b", "")):
        with pytest.raises(APIKeyError):
            read_api_key(key, key_file)
    with pytest.raises(SystemExit):
        parse_config(["--api-key", "a", "--api-key-file", str(empty)])


# ---- model errors -> statuses --------------------------------------------------------------


@pytest.mark.parametrize(
    "message, status, code",
    [
        (ModelError("invalid_request", "bad", "x", "c").encode(), 400, "c"),
        (ModelError("busy", "64 requests are already waiting").encode(), 503, "server_busy"),
        (
            ModelError("unavailable", "the model is shutting down").encode(),
            503,
            "model_unavailable",
        ),
        (ModelError("internal", "internal error (request id 1)").encode(), 500, "internal_error"),
        (
            "Server is stopping, scheduler for model has stopped accepting new inference requests",
            503,
            "model_unavailable",
        ),
        (
            "Request for unknown model: 'qwen2_5_vl' has no available versions",
            503,
            "model_unavailable",
        ),
        # The model's Python-backend stub died (SIGKILL, OOM): this replica cannot serve.
        ("Stub process 'qwen2_5_vl_0_0' is not healthy.", 503, "backend_unavailable"),
        ("internal error while generating (request id r1)", 500, "internal_error"),
        ("Traceback ... File /opt/x.py at 0x7f00deadbeef", 500, "internal_error"),
    ],
)
def test_model_errors_map_to_statuses_without_their_text(message, status, code):
    error = model_error(InferenceServerException(msg=message), "r1")
    assert (error.status, error.code) == (status, code)
    if status != 400:
        assert message not in error.message and "0x" not in error.message
    if status == 503:
        assert error.headers == {"Retry-After": "1"}


# ---- draining ------------------------------------------------------------------------------


async def test_drain_waits_for_in_flight_then_stops():
    admission = Admission(AdmissionSettings(max_concurrent_requests=2))
    assert admission.try_enter() and admission.try_enter() and not admission.try_enter()
    stopped = asyncio.Event()
    drain = Drain(admission, timeout_s=5, stop=stopped.set)
    drain.on_signal()
    assert admission.draining and not stopped.is_set()
    admission.leave()
    await asyncio.sleep(0.05)
    assert not stopped.is_set()
    admission.leave()
    await asyncio.wait_for(stopped.wait(), 1)
    assert not admission.aborting


async def test_drain_timeout_aborts_streams_and_a_second_signal_stops_at_once():
    admission = Admission(AdmissionSettings())
    admission.try_enter()
    stopped = asyncio.Event()
    Drain(admission, timeout_s=0.05, stop=stopped.set).on_signal()
    await asyncio.wait_for(stopped.wait(), 1)
    assert admission.aborting

    admission = Admission(AdmissionSettings())
    admission.try_enter()
    stopped = asyncio.Event()
    drain = Drain(admission, timeout_s=60, stop=stopped.set)
    drain.on_signal()
    drain.on_signal()
    await asyncio.wait_for(stopped.wait(), 1)
    assert admission.aborting
