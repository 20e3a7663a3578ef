"""Malformed and hostile requests against the real app (fake backend): each gets a 4xx
envelope (or is served, for images that are odd but valid), never a 5xx, never internal
text, and the server answers a normal request right after."""

from __future__ import annotations

import gzip
import json

import pytest
from hardening_helpers import (
    CHAT,
    NORMAL_REQUEST,
    assert_envelope,
    assert_no_leak,
    json_bytes,
    post_head,
    raw_http,
)
from helpers import data_url
from hostile_samples import (
    ANIMATED_GIF,
    BOMB_PNG,
    CMYK_JPEG,
    CORRUPT_JPEG,
    GOOD_JPEG,
    NOT_AN_IMAGE,
    ONE_BY_10000,
    ONE_BY_ONE,
    OVER_40MP_PNG,
    PNG_16BIT,
    TRUNCATED_HEADER_PNG,
    TRUNCATED_JPEG,
    WEBP,
)
from proxy_fakes import FakeBackend

pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def with_image(url: str) -> dict:
    return user(
        [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]
    )


IMAGE = "messages[0].content[1].image_url"

# (raw body, expected status, expected code or None, expected param or None)
HOSTILE_BODIES = [
    pytest.param(b"{not json", 400, "invalid_json", None, id="bad-json"),
    pytest.param(b"", 400, "invalid_json", None, id="empty-body"),
    pytest.param(b"\xff\xfe{\x00", 400, "invalid_json", None, id="not-utf8"),
    pytest.param(b"[]", 400, "invalid_body", None, id="json-array"),
    pytest.param(b"null", 400, "invalid_body", None, id="json-null"),
    pytest.param(b"1e309", 400, "invalid_body", None, id="json-infinity"),
    pytest.param(
        b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        400,
        "invalid_json",
        None,
        id="deep-nesting",
    ),
    pytest.param(
        b'{"messages": ' + b"9" * 5000 + b"}", 400, "invalid_json", None, id="5000-digit-int"
    ),
    pytest.param(json_bytes({}), 400, "missing_required_parameter", "messages", id="no-messages"),
    pytest.param(
        json_bytes({"messages": []}), 400, "invalid_value", "messages", id="empty-messages"
    ),
    pytest.param(
        json_bytes({"messages": None}), 400, "invalid_type", "messages", id="null-messages"
    ),
    pytest.param(
        json_bytes({"messages": "hi"}), 400, "invalid_type", "messages", id="str-messages"
    ),
    pytest.param(
        json_bytes({"messages": [None]}), 400, "invalid_type", "messages[0]", id="null-msg"
    ),
    pytest.param(
        json_bytes({"messages": [{"role": "hacker", "content": "x"}]}),
        400,
        "invalid_value",
        "messages[0].role",
        id="unknown-role",
    ),
    pytest.param(
        json_bytes({"messages": [{"role": "user"}]}),
        400,
        "missing_required_parameter",
        "messages[0].content",
        id="no-content",
    ),
    pytest.param(json_bytes(user(5)), 400, "invalid_type", "messages[0].content", id="int-content"),
    pytest.param(
        json_bytes(user([{"type": "text"}])), 400, None, None, id="text-part-without-text"
    ),
    pytest.param(
        json_bytes(user([{"type": "image_url", "image_url": None}])),
        400,
        None,
        None,
        id="null-image-url",
    ),
    pytest.param(
        json_bytes(user([{"type": "image_url", "image_url": {"url": 5}}])),
        400,
        None,
        None,
        id="int-url",
    ),
    pytest.param(
        json_bytes(user([{"type": "audio", "x": 1}])),
        400,
        "unsupported_content_type",
        None,
        id="audio",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "max_tokens": -1}),
        400,
        "invalid_value",
        "max_tokens",
        id="neg-max",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "max_tokens": 0}),
        400,
        "invalid_value",
        "max_tokens",
        id="zero-max",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "max_tokens": 2**64}),
        400,
        "invalid_value",
        "max_tokens",
        id="max-2^64",
    ),
    pytest.param(
        json_bytes(NORMAL_REQUEST)[:-1] + b', "max_tokens": 1e309}',
        400,
        "invalid_type",
        "max_tokens",
        id="max-1e309",
    ),
    pytest.param(
        json_bytes(NORMAL_REQUEST)[:-1] + b', "temperature": NaN}',
        400,
        "invalid_value",
        "temperature",
        id="temperature-nan",
    ),
    pytest.param(
        json_bytes(NORMAL_REQUEST)[:-1] + b', "temperature": -Infinity}',
        400,
        "invalid_value",
        "temperature",
        id="temperature-neg-inf",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "seed": 2**64}), 400, "invalid_value", "seed", id="seed-2^64"
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "top_k": 2**40}),
        400,
        "invalid_value",
        "top_k",
        id="top-k-big",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "n": 2**64}), 400, "invalid_value", "n", id="n-2^64"
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "min_pixels": 2**64}),
        400,
        "invalid_value",
        "min_pixels",
        id="pixels-2^64",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "model": 5}), 400, "invalid_type", "model", id="int-model"
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "model": "../../etc/passwd"}),
        404,
        "model_not_found",
        "model",
        id="model",
    ),
    pytest.param(
        json_bytes({**NORMAL_REQUEST, "stop": ["x"] * 17}),
        400,
        "invalid_value",
        "stop",
        id="17-stops",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}',
        400,
        "invalid_unicode",
        "messages[0].content",
        id="lone-surrogate",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": [{"type": "\\udfff"}]}]}',
        400,
        None,
        None,
        id="lone-surrogate-echoed",
    ),
    pytest.param(
        json_bytes(user([{"type": "image_url", "image_url": {"url": data_url(GOOD_JPEG)}}] * 17)),
        400,
        "too_many_images",
        "messages[0].content[16].image_url",
        id="17-images",
    ),
    pytest.param(
        json_bytes({"messages": [{"role": "user", "content": "x"}] * 513}),
        400,
        "too_many_messages",
        "messages",
        id="513-messages",
    ),
    pytest.param(
        json_bytes(user("x" * 1_000_001)),
        400,
        "text_too_long",
        "messages[0].content",
        id="1M-chars",
    ),
    # images
    pytest.param(
        json_bytes(with_image(data_url(BOMB_PNG))), 400, "image_too_large", IMAGE, id="bomb-png"
    ),
    pytest.param(
        json_bytes(with_image(data_url(OVER_40MP_PNG))),
        400,
        "image_too_large",
        IMAGE,
        id="48MP-png",
    ),
    pytest.param(
        json_bytes(with_image(data_url(ONE_BY_10000))),
        400,
        "image_aspect_ratio_too_large",
        IMAGE,
        id="1x10000",
    ),
    pytest.param(
        json_bytes(with_image(data_url(TRUNCATED_HEADER_PNG))),
        400,
        "invalid_image",
        IMAGE,
        id="trunc-png",
    ),
    pytest.param(
        json_bytes(with_image(data_url(TRUNCATED_JPEG, "image/jpeg"))),
        400,
        "invalid_image",
        IMAGE,
        id="trunc-jpeg",
    ),
    pytest.param(
        json_bytes(with_image(data_url(CORRUPT_JPEG, "image/jpeg"))),
        400,
        "invalid_image",
        IMAGE,
        id="corrupt-jpeg",
    ),
    pytest.param(
        json_bytes(with_image(data_url(NOT_AN_IMAGE))), 400, "invalid_image", IMAGE, id="pdf"
    ),
    pytest.param(
        json_bytes(with_image("data:image/png;base64,@@@not-base64")),
        400,
        "invalid_image",
        IMAGE,
        id="b64",
    ),
    pytest.param(
        json_bytes(with_image(data_url(b"<b>", "text/html"))),
        400,
        "invalid_image",
        IMAGE,
        id="text-data-url",
    ),
    pytest.param(
        json_bytes(with_image("file:///etc/passwd")),
        400,
        "image_url_forbidden",
        IMAGE,
        id="file-url",
    ),
    pytest.param(
        json_bytes(with_image("data:image/png;base64," + "A" * (32 * 1024 * 1024))),
        400,
        "image_too_large",
        IMAGE,
        id="24MB-image",
    ),
    # odd but valid images are served
    pytest.param(
        json_bytes(with_image(data_url(CMYK_JPEG, "image/jpeg"))), 200, None, None, id="cmyk"
    ),
    pytest.param(json_bytes(with_image(data_url(PNG_16BIT))), 200, None, None, id="16-bit"),
    pytest.param(
        json_bytes(with_image(data_url(ANIMATED_GIF, "image/gif"))), 200, None, None, id="gif"
    ),
    pytest.param(json_bytes(with_image(data_url(WEBP, "image/webp"))), 200, None, None, id="webp"),
    pytest.param(json_bytes(with_image(data_url(ONE_BY_ONE))), 200, None, None, id="1x1"),
]


async def assert_healthy(client) -> None:
    response = await client.post(CHAT, json=NORMAL_REQUEST)
    assert response.status == 200, await response.text()
    assert (await response.json())["choices"][0]["message"]["content"] == "Hello world!"


@pytest.mark.parametrize("body, status, code, param", HOSTILE_BODIES)
async def test_hostile_body_gets_its_status_and_no_leak(make_client, body, status, code, param):
    client = await make_client(FakeBackend())
    response = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    text = await response.text()
    assert response.status == status, text
    assert response.headers["X-Request-Id"]
    assert_no_leak(text)
    if status != 200:
        error = assert_envelope(json.loads(text), code)
        if param is not None:
            assert error["param"] == param
    await assert_healthy(client)


async def test_min_image_side_refuses_a_1x1_image_when_configured(make_client):
    client = await make_client(FakeBackend(), min_image_side=2)
    response = await client.post(CHAT, json=with_image(data_url(ONE_BY_ONE)))
    assert response.status == 400
    assert assert_envelope(await response.json(), "image_too_small")["param"] == IMAGE


# ---- bodies: size and framing --------------------------------------------------------------


async def test_declared_oversized_body_is_refused_before_reading(make_client):
    client = await make_client(FakeBackend(), max_request_bytes=64 * 1024)
    # Only the head is sent: the answer comes without the server waiting for 10 MB.
    status, _, body = await raw_http(client.server.port, post_head(length=10 * 1024 * 1024))
    assert status == 413
    assert_envelope(json.loads(body), "request_too_large")
    await assert_healthy(client)


async def test_chunked_oversized_body_is_refused_while_reading(make_client):
    client = await make_client(FakeBackend(), max_request_bytes=64 * 1024)

    async def chunks():
        for _ in range(100):
            yield b" " * 4096

    response = await client.post(CHAT, data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert_envelope(await response.json(), "request_too_large")
    await assert_healthy(client)


async def test_gzip_bomb_body_is_cut_at_the_limit(make_client):
    client = await make_client(FakeBackend(), max_request_bytes=256 * 1024)
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in ~64 KiB
    response = await client.post(
        CHAT, data=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert response.status == 413
    await assert_healthy(client)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param("Content-Length: abc\r\n", id="non-numeric"),
        pytest.param("Content-Length: -5\r\n", id="negative"),
        pytest.param("Content-Length: 5\r\nContent-Length: 7\r\n", id="conflicting"),
        pytest.param("Content-Length: 99999999999999999999999\r\n", id="huge"),
        pytest.param("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="with-chunked"),
        pytest.param("Transfer-Encoding: gzip, chunked, identity\r\n", id="bad-te"),
    ],
)
async def test_bad_content_length_headers_get_4xx(make_client, head):
    client = await make_client(FakeBackend())
    status, _, body = await raw_http(client.server.port, post_head(extra=head) + b"{}")
    assert status is not None and 400 <= status < 500, (status, body)
    assert_no_leak(body.decode("utf-8", "replace"))
    await assert_healthy(client)


async def test_body_shorter_than_its_content_length_gets_4xx(make_client):
    client = await make_client(FakeBackend(), request_body_timeout_s=0.5)
    body = json_bytes(NORMAL_REQUEST)
    # The client stops sending but keeps the connection open: the body timeout answers.
    status, _, answer = await raw_http(client.server.port, post_head(length=len(body) + 50) + body)
    assert status == 408
    assert_envelope(json.loads(answer), "request_timeout")
    # The client half-closes instead: nothing to answer, nothing broken.
    status, _, answer = await raw_http(
        client.server.port, post_head(length=len(body) + 50) + body, close_write=True
    )
    assert status is None or 400 <= status < 500
    await assert_healthy(client)


async def test_bytes_past_the_content_length_are_a_bad_next_request(make_client):
    client = await make_client(FakeBackend())
    body = json_bytes(NORMAL_REQUEST)
    # aiohttp parses the surplus as a pipelined request; the parse error of that one answers
    # the whole packet with its plain-text 400 (no envelope: no handler ever ran).
    status, _, answer = await raw_http(
        client.server.port, post_head(length=len(body)) + body + b"GARBAGE / HTTP/1.1\r\n\r\n"
    )
    assert status == 400, answer
    assert_no_leak(answer.decode("utf-8", "replace"))
    await assert_healthy(client)


async def test_unknown_routes_and_methods_are_4xx_envelopes(make_client):
    client = await make_client(FakeBackend())
    for method, path, status in (
        ("GET", CHAT, 405),
        ("POST", "/v1/embeddings", 404),
        ("DELETE", "/v1/models", 405),
        ("GET", "/../../etc/passwd", 404),
    ):
        response = await client.request(method, path)
        assert response.status == status
        assert_envelope(await response.json())
    await assert_healthy(client)
