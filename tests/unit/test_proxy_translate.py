"""OpenAI request -> TritonRequest, image decoding, and the response body builders."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.errors import APIError
from proxy.schema import parse_chat_request
from proxy.translate import (
    CompletionIdentity,
    TokenUsage,
    chunk_body,
    completion_body,
    load_image_bytes,
    to_triton_request,
    usage_chunk_body,
)

SERVED = "qwen2.5-vl-7b-instruct"
PNG = b"\x89PNG\r\n\x1a\n" + b"png-body"
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-body"
GIF = b"GIF89a" + b"gif-body"
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"webp-body"


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def translate(body: dict):
    return to_triton_request(parse_chat_request(body, SERVED))


def api_error(body: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        translate(body)
    return caught.value


# ---- messages and images -------------------------------------------------------------------


def test_images_become_placeholders_and_bytes_in_order_of_appearance():
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    image_part(data_url(PNG)),
                    {"type": "text", "text": "compare with"},
                    image_part(data_url(JPEG, "image/jpeg")),
                ],
            },
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "and"},
                    image_part(data_url(GIF, "image/gif")),
                ],
            },
        ]
    }

    request = translate(body)

    assert request.images == [PNG, JPEG, GIF]
    assert json.loads(request.messages_json) == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "compare with"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"}]},
    ]


def test_image_only_message():
    request = translate(
        {"messages": [{"role": "user", "content": [image_part(data_url(WEBP, "image/webp"))]}]}
    )
    assert request.images == [WEBP]
    assert json.loads(request.messages_json) == [{"role": "user", "content": [{"type": "image"}]}]


def test_string_content_passes_through_with_unicode_intact():
    request = translate({"messages": [{"role": "user", "content": "这张图片里有什么？"}]})
    assert request.images == []
    assert "这张图片里有什么？" in request.messages_json  # UTF-8, not \u escapes
    assert json.loads(request.messages_json) == [{"role": "user", "content": "这张图片里有什么？"}]


def test_bare_string_image_url_is_accepted():
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": data_url(PNG)}]}
        ]
    }
    assert translate(body).images == [PNG]


def test_developer_role_becomes_system_and_null_content_becomes_empty():
    body = {
        "messages": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None},
        ]
    }
    messages = json.loads(translate(body).messages_json)
    assert messages[0] == {"role": "system", "content": "rules"}
    assert messages[2] == {"role": "assistant", "content": ""}


def test_only_role_and_content_reach_the_model():
    body = {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    assert json.loads(translate(body).messages_json) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "url",
    [
        data_url(PNG).replace("image/png", "IMAGE/PNG"),
        data_url(JPEG, "image/jpg"),
        "data:image/png;name=x.png;base64," + base64.b64encode(PNG).decode(),
        # MIME-wrapped base64 (line breaks every 76 characters) from some encoders.
        "data:image/png;base64," + base64.encodebytes(PNG * 20).decode(),
    ],
    ids=["upper-case", "jpg-alias", "extra-params", "line-wrapped"],
)
def test_data_url_variants_decode(url):
    assert load_image_bytes(url, "p").startswith((PNG[:8], JPEG[:3]))


# ---- image errors --------------------------------------------------------------------------


def bad_image_body(url: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "first"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x"},
                    image_part(data_url(PNG)),
                    image_part(url),
                ],
            },
        ]
    }


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not*valid*base64",
        "data:image/png;base64,iVBORw0KGgo",  # truncated: bad padding
        "data:image/png;base64,",
        "data:image/png;base64,5Lit5paH",  # valid base64, not an image
        "data:text/plain;base64," + base64.b64encode(PNG).decode(),
        "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(),
        "data:image/png," + PNG.decode("latin-1"),  # not base64-encoded
    ],
    ids=["bad-chars", "bad-padding", "empty", "not-an-image", "text-plain", "svg", "no-base64"],
)
def test_bad_image_data_is_invalid_image_with_param(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.type, error.code) == (400, "invalid_request_error", "invalid_image")
    assert error.param == "messages[1].content[2].image_url"


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_url_is_unsupported_image_url(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.code) == (400, "unsupported_image_url")
    assert error.param == "messages[1].content[2].image_url"
    assert "remote image urls are not enabled" in error.message.lower()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://host/a.png", "/tmp/a.png", "iVBORw0KGgo="]
)
def test_other_schemes_are_rejected(url):
    error = api_error(bad_image_body(url))
    assert (error.status, error.code) == (400, "invalid_image_url")
    assert error.param == "messages[1].content[2].image_url"
    assert "passwd" not in error.message


# ---- sampling parameters -------------------------------------------------------------------


def test_sampling_parameters_only_include_what_the_client_set():
    request = translate({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
    assert request.sampling_parameters == {"temperature": 0.5}
    assert request.stream is False


def test_all_sampling_parameters_translate():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 7,
        "stop": "END",
        "repetition_penalty": 1.05,
        "stream": True,
    }
    request = translate(body)
    assert request.sampling_parameters == {
        "max_tokens": 10,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 7,
        "stop": ["END"],
        "repetition_penalty": 1.05,
    }
    assert request.stream is True


def test_max_completion_tokens_wins_over_max_tokens():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "max_completion_tokens": 3,
    }
    assert translate(body).sampling_parameters == {"max_tokens": 3}


def test_stop_list_and_nulls():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "stop": ["a", "b"],
        "temperature": None,
        "seed": None,
    }
    assert translate(body).sampling_parameters == {"stop": ["a", "b"]}


# ---- response builders ---------------------------------------------------------------------

IDENTITY = CompletionIdentity(id="chatcmpl-abc", created=1700000000, model=SERVED)


def test_completion_identity_is_unique_and_prefixed():
    first, second = CompletionIdentity.new(SERVED), CompletionIdentity.new(SERVED)
    assert first.id.startswith("chatcmpl-") and len(first.id) == len("chatcmpl-") + 32
    assert first.id != second.id
    assert first.model == SERVED and isinstance(first.created, int)


def test_completion_body():
    body = completion_body(
        IDENTITY, "a cat", "length", TokenUsage(prompt_tokens=5, completion_tokens=2)
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
