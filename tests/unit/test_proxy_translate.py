"""OpenAI request -> TritonRequest (pure), inline images, pixel budgets, sampling
parameters, and the response body builders."""

from __future__ import annotations

import base64
import json

import pytest
from helpers import data_url

from proxy.api.chat.render import (
    ChoiceText,
    CompletionIdentity,
    TokenUsage,
    chunk_body,
    completion_body,
    usage_chunk_body,
)
from proxy.errors import APIError
from proxy.media.images import IMAGE
from proxy.media.kinds import MediaRef, load_inline, load_media
from proxy.media.pixels import LOW_DETAIL_MAX_PIXELS, PixelLimits
from proxy.request.schema import parse_chat_request
from proxy.request.translate import ServerLimits, prepare_chat

SERVED = "qwen2.5-vl-7b-instruct"
PNG = b"\x89PNG\r\n\x1a\n" + b"png-body"
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-body"
GIF = b"GIF89a" + b"gif-body"
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"webp-body"
LIMITS = ServerLimits(max_tokens=8192)  # as the default --max-tokens-limit
MIN, MAX = 3136, 1003520  # the model's own defaults, the proxy's too
DEFAULT_IMAGE = {"type": "image", "min_pixels": MIN, "max_pixels": MAX}


def image_part(url: str, **image_url) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **image_url}}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def translate(body: dict, limits: ServerLimits = LIMITS):
    """The TritonRequest for a body whose images are all inline."""
    prepared = prepare_chat(parse_chat_request(body), limits)
    media = [load_inline(ref) for ref in prepared.media]
    return prepared.to_triton("qwen2_5_vl", media)


def api_error(body: dict, limits: ServerLimits = LIMITS) -> APIError:
    with pytest.raises(APIError) as caught:
        translate(body, limits)
    return caught.value


def messages_of(body: dict, limits: ServerLimits = LIMITS) -> list:
    return json.loads(translate(body, limits).messages_json)


# ---- messages and images -------------------------------------------------------------------


def test_images_become_placeholders_and_bytes_in_order_of_appearance():
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            user(
                image_part(data_url(PNG)),
                {"type": "text", "text": "compare with"},
                image_part(data_url(JPEG, "image/jpeg")),
            ),
            {"role": "assistant", "content": "ok"},
            user({"type": "text", "text": "and"}, image_part(data_url(GIF, "image/gif"))),
        ]
    }

    request = translate(body)

    assert request.model == "qwen2_5_vl"
    assert request.media["image"] == [PNG, JPEG, GIF]
    assert json.loads(request.messages_json) == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                DEFAULT_IMAGE,
                {"type": "text", "text": "compare with"},
                DEFAULT_IMAGE,
            ],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, DEFAULT_IMAGE]},
    ]


def test_images_in_assistant_turns_keep_their_place_in_the_order():
    body = {
        "messages": [
            user(image_part(data_url(PNG))),
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "here is another"},
                    image_part(data_url(GIF, "image/gif")),
                ],
            },
            user(image_part(data_url(JPEG, "image/jpeg")), image_part(data_url(WEBP))),
        ]
    }
    request = translate(body)
    assert request.media["image"] == [PNG, GIF, JPEG, WEBP]
    messages = json.loads(request.messages_json)
    assert messages[1]["content"] == [{"type": "text", "text": "here is another"}, DEFAULT_IMAGE]


def test_image_refs_carry_their_param_and_remote_urls_are_left_for_the_fetcher():
    body = {
        "messages": [
            user({"type": "text", "text": "x"}, image_part("https://example.com/a.png")),
            user(image_part(data_url(PNG)), image_part("HTTP://example.com/b.jpg")),
        ]
    }
    prepared = prepare_chat(parse_chat_request(body), LIMITS)
    assert [(ref.kind, ref.url, ref.param) for ref in prepared.media] == [
        (IMAGE, "https://example.com/a.png", "messages[0].content[1].image_url"),
        (IMAGE, data_url(PNG), "messages[1].content[0].image_url"),
        (IMAGE, "HTTP://example.com/b.jpg", "messages[1].content[1].image_url"),
    ]
    assert [ref.is_remote for ref in prepared.media] == [True, False, True]


def test_image_only_message():
    request = translate({"messages": [user(image_part(data_url(WEBP, "image/webp")))]})
    assert request.media["image"] == [WEBP]
    assert json.loads(request.messages_json) == [{"role": "user", "content": [DEFAULT_IMAGE]}]


def test_string_content_passes_through_with_unicode_intact():
    request = translate({"messages": [{"role": "user", "content": "这张图片里有什么？"}]})
    assert request.media == {}
    assert "这张图片里有什么？" in request.messages_json  # UTF-8, not \u escapes
    assert json.loads(request.messages_json) == [{"role": "user", "content": "这张图片里有什么？"}]


def test_bare_string_image_url_is_accepted():
    body = {"messages": [user({"type": "image_url", "image_url": data_url(PNG)})]}
    assert translate(body).media["image"] == [PNG]


def test_developer_role_becomes_system_and_null_content_becomes_empty():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {
        "messages": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }
    messages = messages_of(body)
    assert messages[0] == {"role": "system", "content": "rules"}
    assert messages[2] == {"role": "assistant", "content": "", "tool_calls": [call]}


def test_only_role_and_content_reach_the_model():
    body = {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    assert messages_of(body) == [{"role": "user", "content": "hi"}]


def test_to_triton_needs_one_image_per_ref():
    prepared = prepare_chat(
        parse_chat_request({"messages": [user(image_part(data_url(PNG)))]}), LIMITS
    )
    with pytest.raises(ValueError):
        prepared.to_triton("m", [])


@pytest.mark.parametrize(
    "url",
    [
        data_url(PNG).replace("image/png", "IMAGE/PNG"),
        data_url(JPEG, "image/jpg"),
        data_url(PNG, "image/png;name=x.png"),
        # MIME-wrapped base64 (line breaks every 76 characters) from some encoders.
        "data:image/png;base64," + base64.encodebytes(PNG * 20).decode(),
    ],
    ids=["upper-case", "jpg-alias", "extra-params", "line-wrapped"],
)
def test_data_url_variants_decode(url):
    assert load_inline(MediaRef(IMAGE, url, "p")).startswith((PNG[:8], JPEG[:3]))


# ---- pixel budgets -------------------------------------------------------------------------


def budgets(body: dict, limits: ServerLimits = LIMITS) -> list[tuple[int, int]]:
    return [
        (part["min_pixels"], part["max_pixels"])
        for message in messages_of(body, limits)
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image"
    ]


SMALL_SERVER = ServerLimits(pixels=PixelLimits(min_pixels=784, max_pixels=100_000))


@pytest.mark.parametrize(
    "top, image_url, limits, expected",
    [
        ({}, {}, LIMITS, (MIN, MAX)),
        ({}, {"detail": "auto"}, LIMITS, (MIN, MAX)),
        ({}, {"detail": "high"}, LIMITS, (MIN, MAX)),
        ({}, {"detail": "low"}, LIMITS, (MIN, LOW_DETAIL_MAX_PIXELS)),
        ({}, {"detail": "low"}, SMALL_SERVER, (784, 100_000)),  # low never above the server max
        ({}, {"detail": "high"}, SMALL_SERVER, (784, 100_000)),
        ({"max_pixels": 401408}, {}, LIMITS, (MIN, 401408)),
        ({"min_pixels": 6272, "max_pixels": 401408}, {}, LIMITS, (6272, 401408)),
        # Explicit numbers win over detail, per-image ones over the request's.
        ({"max_pixels": 401408}, {"detail": "low"}, LIMITS, (MIN, 401408)),
        ({"max_pixels": 401408}, {"max_pixels": 50176}, LIMITS, (MIN, 50176)),
        ({"min_pixels": 6272}, {"min_pixels": 12544, "detail": "low"}, LIMITS, (12544, 200704)),
        ({}, {"min_pixels": MAX, "max_pixels": MAX}, LIMITS, (MAX, MAX)),  # the edges are in
    ],
)
def test_pixel_budget_table(top, image_url, limits, expected):
    body = {"messages": [user(image_part(data_url(PNG), **image_url))], **top}
    assert budgets(body, limits) == [expected]


def test_budgets_are_per_image():
    body = {
        "messages": [
            user(
                image_part(data_url(PNG), detail="low"),
                image_part(data_url(PNG)),
                image_part(data_url(PNG), max_pixels=100352),
            )
        ],
        "min_pixels": 6272,
    }
    assert budgets(body) == [(6272, LOW_DETAIL_MAX_PIXELS), (6272, MAX), (6272, 100352)]


@pytest.mark.parametrize(
    "top, image_url, param",
    [
        ({"max_pixels": MAX + 1}, {}, "max_pixels"),
        ({"min_pixels": MIN - 1}, {}, "min_pixels"),
        ({"min_pixels": MAX + 28}, {}, "min_pixels"),
        ({}, {"max_pixels": 2 * MAX}, "messages[0].content[0].image_url.max_pixels"),
        ({}, {"min_pixels": 784}, "messages[0].content[0].image_url.min_pixels"),
        # In range each, but min > max for this image.
        ({"min_pixels": 401408}, {"detail": "low"}, "messages[0].content[0].image_url"),
        ({}, {"min_pixels": 50176, "max_pixels": 12544}, "messages[0].content[0].image_url"),
    ],
)
def test_pixel_bounds_outside_server_limits_are_400(top, image_url, param):
    body = {"messages": [user(image_part(data_url(PNG), **image_url))], **top}
    error = api_error(body)
    assert (error.status, error.code, error.param) == (400, "invalid_value", param)


def test_request_pixel_bounds_are_checked_even_without_images():
    error = api_error({"messages": [{"role": "user", "content": "hi"}], "max_pixels": 10**9})
    assert (error.code, error.param) == ("invalid_value", "max_pixels")


# ---- image errors --------------------------------------------------------------------------


def bad_image_body(url: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "first"},
            user({"type": "text", "text": "x"}, image_part(data_url(PNG)), image_part(url)),
        ]
    }


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not*valid*base64",
        "data:image/png;base64,iVBORw0KGgo",  # truncated: bad padding
        "data:image/png;base64,",
        "data:image/png;base64,5Lit5paH",  # valid base64, not an image
        data_url(PNG, "text/plain"),
        "data:text/html,<script>alert(1)</script>",
        data_url(b"<svg/>", "image/svg+xml"),
        "data:image/png," + PNG.decode("latin-1"),  # not base64-encoded
    ],
    ids=[
        "bad-chars",
        "bad-padding",
        "empty",
        "not-an-image",
        "text-plain",
        "text-html",
        "svg",
        "no-base64",
    ],
)
def test_bad_image_data_is_invalid_image_with_param(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.type, error.code) == (400, "invalid_request_error", "invalid_image")
    assert error.param == "messages[1].content[2].image_url"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://host/a.png", "gopher://x/", "FILE:/x"]
)
def test_other_schemes_are_forbidden(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.code) == (400, "image_url_forbidden")
    assert error.param == "messages[1].content[2].image_url"
    assert "passwd" not in error.message


@pytest.mark.parametrize("url", ["/tmp/a.png", "iVBORw0KGgo=", "", "  "])
def test_urls_without_a_scheme_are_invalid(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.code) == (400, "invalid_image_url")


async def test_load_images_without_fetcher_refuses_remote_urls():
    refs = [MediaRef(IMAGE, data_url(PNG), "a"), MediaRef(IMAGE, "https://example.com/x.png", "b")]
    with pytest.raises(APIError) as caught:
        await load_media(refs, None)
    assert (caught.value.code, caught.value.param) == ("image_url_forbidden", "b")
    assert "disabled" in caught.value.message


class RecordingFetcher:
    def __init__(self):
        self.calls = []

    async def fetch_all(self, refs):
        self.calls.append(list(refs))
        return [ref.url.encode() for ref in refs]


async def test_load_images_interleaves_fetched_and_inline_in_order():
    fetcher = RecordingFetcher()
    refs = [
        MediaRef(IMAGE, "https://a.example/1", "p0"),
        MediaRef(IMAGE, data_url(PNG), "p1"),
        MediaRef(IMAGE, "http://b.example/2", "p2"),
    ]
    assert await load_media(refs, fetcher) == [b"https://a.example/1", PNG, b"http://b.example/2"]
    assert fetcher.calls == [[refs[0], refs[2]]]  # one batch, so they are fetched together


async def test_bad_inline_image_fails_before_any_fetch():
    fetcher = RecordingFetcher()
    refs = [
        MediaRef(IMAGE, "https://a.example/1", "p0"),
        MediaRef(IMAGE, "data:image/png;base64,@@", "p1"),
    ]
    with pytest.raises(APIError) as caught:
        await load_media(refs, fetcher)
    assert caught.value.param == "p1"
    assert fetcher.calls == []


# ---- sampling parameters -------------------------------------------------------------------


def params(limits: ServerLimits = LIMITS, **fields) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return translate(body, limits).sampling_parameters


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, {}),
        ({"temperature": 0.5}, {"temperature": 0.5}),
        ({"temperature": 0}, {"temperature": 0}),  # greedy
        ({"max_tokens": 10}, {"max_tokens": 10}),
        ({"max_completion_tokens": 3}, {"max_tokens": 3}),
        ({"max_tokens": 10, "max_completion_tokens": 3}, {"max_tokens": 3}),
        ({"max_tokens": 3, "max_completion_tokens": 10}, {"max_tokens": 10}),
        ({"max_tokens": 100_000}, {"max_tokens": 8192}),  # clamped to --max-tokens-limit
        ({"top_p": 0.9, "top_k": 20}, {"top_p": 0.9, "top_k": 20}),
        ({"repetition_penalty": 1.05}, {"repetition_penalty": 1.05}),
        (
            {"presence_penalty": -2, "frequency_penalty": 2},
            {"presence_penalty": -2, "frequency_penalty": 2},
        ),
        ({"seed": 7}, {"seed": 7}),
        ({"stop": "END"}, {"stop": ["END"]}),
        ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
        ({"stop": []}, {}),
        ({"logprobs": True}, {"logprobs": True, "top_logprobs": 0}),
        ({"logprobs": True, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 5}),
        ({"logprobs": False}, {}),
        ({"temperature": None, "seed": None}, {}),
        # Accepted, with no sampling effect.
        ({"user": "u-1", "n": 1, "response_format": {"type": "text"}}, {}),
        ({"min_pixels": 6272}, {}),
    ],
)
def test_sampling_parameter_table(fields, expected):
    assert params(**fields) == expected


def test_max_tokens_limit_zero_means_no_proxy_limit():
    assert params(ServerLimits(max_tokens=0), max_tokens=100_000) == {"max_tokens": 100_000}
    assert params(ServerLimits(max_tokens=64), max_completion_tokens=65) == {"max_tokens": 64}


def test_stream_flag_travels():
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert translate(body).stream is True
    assert translate({"messages": [{"role": "user", "content": "hi"}]}).stream is False


# ---- response builders ---------------------------------------------------------------------

IDENTITY = CompletionIdentity(id="chatcmpl-abc", created=1700000000, model=SERVED)


def test_completion_identity_is_unique_and_prefixed():
    first, second = CompletionIdentity.new(SERVED), CompletionIdentity.new(SERVED)
    assert first.id.startswith("chatcmpl-") and len(first.id) == len("chatcmpl-") + 32
    assert first.id != second.id
    assert first.model == SERVED and isinstance(first.created, int)


def test_completion_body():
    body = completion_body(
        IDENTITY, [ChoiceText("a cat", "length")], TokenUsage(prompt_tokens=5, completion_tokens=2)
    )
    assert body == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": SERVED,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a cat"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def test_chunk_body_without_usage_has_no_usage_key():
    body = chunk_body(IDENTITY, {"content": "x"})
    assert body == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": SERVED,
        "choices": [
            {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}
        ],
    }


def test_chunk_body_with_include_usage_has_null_usage():
    body = chunk_body(IDENTITY, {}, "stop", include_usage=True)
    assert body["usage"] is None
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["delta"] == {}


def test_usage_chunk_body():
    body = usage_chunk_body(IDENTITY, TokenUsage(prompt_tokens=3, completion_tokens=4))
    assert body["choices"] == []
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert body["id"] == "chatcmpl-abc" and body["object"] == "chat.completion.chunk"


def test_usage_with_image_tokens_has_prompt_tokens_details():
    usage = TokenUsage(prompt_tokens=300, completion_tokens=4, image_tokens=256)
    assert usage.as_dict() == {
        "prompt_tokens": 300,
        "completion_tokens": 4,
        "total_tokens": 304,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 256},
    }
    zero = TokenUsage(prompt_tokens=5, completion_tokens=1, image_tokens=0)
    assert zero.as_dict()["prompt_tokens_details"] == {"cached_tokens": 0, "image_tokens": 0}


def test_completion_body_with_logprobs():
    entries = [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]
    body = completion_body(IDENTITY, [ChoiceText("a", "stop", entries)], TokenUsage())
    assert body["choices"][0]["logprobs"] == {"content": entries}
    assert completion_body(IDENTITY, [ChoiceText("a", "stop", [])], TokenUsage())["choices"][0][
        "logprobs"
    ] == {"content": []}


def test_chunk_body_with_logprobs():
    entries = [{"token": "x", "logprob": -1.0, "bytes": [120], "top_logprobs": []}]
    body = chunk_body(IDENTITY, {"content": "x"}, logprobs=entries)
    assert body["choices"][0]["logprobs"] == {"content": entries}
