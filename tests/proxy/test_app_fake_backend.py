"""The real app from create_app, driven over HTTP, with a scripted backend behind it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from helpers import data_url, sse_payloads
from proxy_fakes import (
    JPEG_BYTES,
    PNG_BYTES,
    SERVED_MODEL,
    TEST_CONFIG,
    FakeBackend,
    script,
    serving,
)

from proxy.errors import APIError
from proxy.transport.backend import GenerationChunk, backend_unavailable
from proxy.transport.contract import Task

# The request body of the original Flask server's client example (README).
FLASK_EXAMPLE = {
    "messages": [
        {"role": "system", "content": "你是一个能描述图像的有帮助的助手。"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "这张图片里有什么？"},
                {"type": "image_url", "image_url": {"url": data_url(JPEG_BYTES, "image/jpeg")}},
            ],
        },
    ],
    "model": SERVED_MODEL,
    "max_tokens": 1280,
}

TEXT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}


def assert_error(body: dict, *, type: str, code: str | None = None, param: str | None = None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert body["error"]["message"]


# ---- non-streaming -------------------------------------------------------------------------


async def test_non_stream_matches_flask_response_shape(make_client):
    backend = FakeBackend(script("图片", "显示了", "一只猫。", prompt_tokens=52))
    client = await make_client(backend)

    resp = await client.post("/v1/chat/completions", json=FLASK_EXAMPLE)

    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == SERVED_MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "图片显示了一只猫。"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 52, "completion_tokens": 3, "total_tokens": 55}
    assert resp.headers["X-Request-Id"] == backend.requests[0][1]


async def test_non_stream_sends_translated_request_to_backend(make_client):
    backend = FakeBackend()
    client = await make_client(backend)

    await client.post("/v1/chat/completions", json=FLASK_EXAMPLE)

    sent = backend.last_request
    assert sent.stream is False
    assert sent.media["image"] == [JPEG_BYTES]
    assert sent.sampling_parameters == {"max_tokens": 1280}
    messages = json.loads(sent.messages_json)
    assert messages[1]["content"] == [
        {"type": "text", "text": "这张图片里有什么？"},
        {"type": "image", "min_pixels": 3136, "max_pixels": 1003520},
    ]
    assert sent.model == "qwen2_5_vl"


async def test_completion_ids_are_unique_per_request(make_client):
    client = await make_client()
    ids = set()
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=TEXT_REQUEST)
        ids.add((await resp.json())["id"])
    assert len(ids) == 3


async def test_length_finish_reason_is_passed_through(make_client):
    client = await make_client(FakeBackend(script("a", "b", finish_reason="length")))
    resp = await client.post("/v1/chat/completions", json=TEXT_REQUEST)
    assert (await resp.json())["choices"][0]["finish_reason"] == "length"


async def test_caller_request_id_is_reused_and_sent_to_backend(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    resp = await client.post(
        "/v1/chat/completions", json=TEXT_REQUEST, headers={"X-Request-Id": "trace-42"}
    )
    assert resp.headers["X-Request-Id"] == "trace-42"
    assert backend.requests[0][1] == "trace-42"


async def test_unsafe_caller_request_id_is_replaced(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    resp = await client.post(
        "/v1/chat/completions", json=TEXT_REQUEST, headers={"X-Request-Id": "a b\tc"}
    )
    assert resp.headers["X-Request-Id"] != "a b\tc"
    assert resp.headers["X-Request-Id"] == backend.requests[0][1]


# ---- streaming -----------------------------------------------------------------------------


async def test_stream_chunks_role_content_finish_done(make_client):
    backend = FakeBackend(script("你", "好", "！", prompt_tokens=5))
    client = await make_client(backend)

    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": True})

    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Request-Id"] == backend.requests[0][1]
    assert backend.last_request.stream is True
    events = sse_payloads(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "你"},
        {"content": "好"},
        {"content": "！"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == SERVED_MODEL for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_stream_skips_empty_deltas(make_client):
    chunks = [
        GenerationChunk("a", None, 3, 1),
        GenerationChunk("", None, 3, 1),
        GenerationChunk("", "stop", 3, 0),
    ]
    client = await make_client(FakeBackend(chunks))
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in sse_payloads(await resp.text())[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {}]


async def test_stream_include_usage_adds_usage_chunk(make_client):
    client = await make_client(FakeBackend(script("a", "b", prompt_tokens=11)))
    body = {**TEXT_REQUEST, "stream": True, "stream_options": {"include_usage": True}}

    resp = await client.post("/v1/chat/completions", json=body)

    events = sse_payloads(await resp.text())
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    assert all(c["usage"] is None for c in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_stream_delivers_chunks_as_they_are_generated(make_client):
    backend = FakeBackend(script("one", "two", "three"), delay_s=0.5)
    client = await make_client(backend)
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": True})

    # The first token arrives well before the backend produces the second one.
    head = await asyncio.wait_for(resp.content.readuntil(b'"content":"one"'), 0.4)

    events = sse_payloads(head.decode() + (await resp.text()))
    assert [e["choices"][0]["delta"] for e in events[:-1]][1:] == [
        {"content": "one"},
        {"content": "two"},
        {"content": "three"},
        {},
    ]


# ---- request errors ------------------------------------------------------------------------


async def test_model_mismatch_is_404_model_not_found(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "model": "gpt-4o"})
    assert resp.status == 404
    assert_error(
        await resp.json(), type="invalid_request_error", code="model_not_found", param="model"
    )
    # the model was asked whether it serves a LoRA adapter of that name; nothing generated
    assert [request.task for request, _ in backend.requests] == [Task.LIST_LORAS]
    assert backend.served_requests == []


async def test_omitted_model_is_accepted(make_client):
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=TEXT_REQUEST)
    assert resp.status == 200
    assert (await resp.json())["model"] == SERVED_MODEL


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00garbage"])
async def test_bad_json_is_400_invalid_json(make_client, raw):
    client = await make_client()
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert_error(await resp.json(), type="invalid_request_error", code="invalid_json")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"3", b"null"])
async def test_non_object_body_is_400(make_client, raw):
    client = await make_client()
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert_error(await resp.json(), type="invalid_request_error", code="invalid_body")


async def test_missing_messages_is_400_with_param(make_client):
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json={"model": SERVED_MODEL})
    assert resp.status == 400
    body = await resp.json()
    assert_error(
        body, type="invalid_request_error", code="missing_required_parameter", param="messages"
    )
    assert "pydantic" not in body["error"]["message"]


async def test_bad_base64_is_400_invalid_image(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,@@not-base64@@"},
                    },
                ],
            }
        ]
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert_error(
        await resp.json(),
        type="invalid_request_error",
        code="invalid_image",
        param="messages[0].content[1].image_url",
    )
    assert backend.requests == []


async def test_remote_image_url_is_400_forbidden_when_fetch_is_disabled(make_client):
    backend = FakeBackend()
    client = await make_client(backend, image_fetch=False)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}],
            }
        ]
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert_error(
        await resp.json(),
        type="invalid_request_error",
        code="image_url_forbidden",
        param="messages[0].content[0].image_url",
    )
    assert backend.requests == []


async def test_n_below_one_is_400(make_client):
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "n": 0})
    assert resp.status == 400
    assert_error(await resp.json(), type="invalid_request_error", code="invalid_value", param="n")


async def test_known_optional_fields_are_accepted_without_ignored_header(make_client):
    client = await make_client()
    body = {**TEXT_REQUEST, "user": "u1", "logprobs": False, "frequency_penalty": 0, "n": 1}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert "X-Ignored-Fields" not in resp.headers


async def test_oversized_body_is_413_envelope(make_client):
    client = await make_client(max_request_bytes=64 * 1024)
    big = data_url(PNG_BYTES + b"\x00" * 100_000)
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}
        ]
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 413
    assert_error(await resp.json(), type="invalid_request_error", code="request_too_large")


async def test_body_over_aiohttp_default_limit_is_accepted(make_client):
    backend = FakeBackend()
    client = await make_client(backend)  # the default 64 MiB limit
    image = PNG_BYTES + b"\x00" * (2 * 1024 * 1024)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}],
            }
        ]
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert backend.last_request.media["image"] == [image]


# ---- backend errors ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_client_error_before_stream_is_400(make_client, stream):
    error = APIError(400, "too many images for this model")
    client = await make_client(FakeBackend(error_at=0, error=error))
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": stream})
    assert resp.status == 400
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["message"] == "too many images for this model"


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_unavailable_before_stream_is_503(make_client, stream):
    client = await make_client(FakeBackend(error_at=0, error=backend_unavailable()))
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": stream})
    assert resp.status == 503
    assert_error(await resp.json(), type="service_unavailable", code="backend_unavailable")


@pytest.mark.parametrize("stream", [False, True])
async def test_unexpected_backend_exception_is_generic_500(make_client, stream, caplog):
    secret = RuntimeError("connect to 10.1.2.3:8001 failed in /opt/secret/model.py")
    backend = FakeBackend(error_at=0, error=secret)
    client = await make_client(backend)

    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": stream})

    assert resp.status == 500
    text = await resp.text()
    assert_error(json.loads(text), type="server_error", code="internal_error")
    request_id = resp.headers["X-Request-Id"]
    assert request_id in json.loads(text)["error"]["message"]
    for leaked in ("10.1.2.3", "/opt/secret", "Traceback", "RuntimeError"):
        assert leaked not in text
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


async def test_backend_error_mid_stream_sends_error_event_then_done(make_client):
    error = APIError(500, "internal server error (request id x)", type="server_error")
    client = await make_client(FakeBackend(script("a", "b", "c"), error_at=2, error=error))

    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": True})

    assert resp.status == 200
    events = sse_payloads(await resp.text())
    assert [e["choices"][0]["delta"] for e in events[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {"content": "b"},
    ]
    assert events[3] == {
        "error": {
            "message": "internal server error (request id x)",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert events[4] == "[DONE]"
    assert len(events) == 5


async def test_unexpected_exception_mid_stream_hides_details(make_client):
    backend = FakeBackend(script("a", "b"), error_at=1, error=ValueError("/srv/secret.py exploded"))
    client = await make_client(backend)
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "stream": True})
    text = await resp.text()
    events = sse_payloads(text)
    assert events[-2]["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"
    assert "secret" not in text and "exploded" not in text


# ---- client disconnects --------------------------------------------------------------------


async def _disconnect_after_first_token(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url, json={**TEXT_REQUEST, "stream": True})
        assert resp.status == 200
        await resp.content.readuntil(b'"content":"t0"')
        resp.close()  # drops the connection mid-stream


async def test_client_disconnect_mid_stream_cancels_backend(make_client):
    backend = FakeBackend(script(*(f"t{i}" for i in range(100))), delay_s=0.05)
    client = await make_client(backend)

    await _disconnect_after_first_token(str(client.make_url("/v1/chat/completions")))

    await asyncio.wait_for(backend.stopped_early.wait(), 2.0)
    assert not backend.finished


async def test_disconnect_detected_on_write_without_handler_cancellation():
    # `python -m proxy` enables handler cancellation; without it, the failed write must
    # still close the backend generator.
    backend = FakeBackend(script(*(f"t{i}" for i in range(100))), delay_s=0.05)
    async with serving(TEST_CONFIG, backend, handler_cancellation=False) as client:
        await _disconnect_after_first_token(str(client.make_url("/v1/chat/completions")))
        await asyncio.wait_for(backend.stopped_early.wait(), 2.0)
        assert not backend.finished


# ---- other routes --------------------------------------------------------------------------


async def test_health_is_ok_even_when_backend_not_ready(make_client):
    client = await make_client(FakeBackend(ready=False))
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert resp.headers["X-Request-Id"]


async def test_ready_follows_backend(make_client):
    ready_client = await make_client(FakeBackend(ready=True))
    resp = await ready_client.get("/ready")
    assert resp.status == 200

    not_ready_client = await make_client(FakeBackend(ready=False))
    resp = await not_ready_client.get("/ready")
    assert resp.status == 503
    assert_error(await resp.json(), type="service_unavailable", code="model_not_ready")


async def test_models_lists_served_name(make_client):
    client = await make_client()
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED_MODEL]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["owned_by"]
    assert isinstance(body["data"][0]["created"], int)


async def test_retrieve_model(make_client):
    client = await make_client()
    assert (await (await client.get(f"/v1/models/{SERVED_MODEL}")).json())["id"] == SERVED_MODEL
    resp = await client.get("/v1/models/other")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_served_name_with_slash(make_client):
    client = await make_client(served_model_name="Qwen/Qwen2.5-VL-7B-Instruct")
    resp = await client.get("/v1/models/Qwen/Qwen2.5-VL-7B-Instruct")
    assert (await resp.json())["id"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    body = {**TEXT_REQUEST, "model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    resp = await client.post("/v1/chat/completions", json=body)
    assert (await resp.json())["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"


async def test_unknown_route_is_404_envelope(make_client):
    client = await make_client()
    resp = await client.post("/v1/embeddings", json={})
    assert resp.status == 404
    assert_error(await resp.json(), type="invalid_request_error", code="not_found")
    assert resp.headers["X-Request-Id"]


async def test_wrong_method_is_405_envelope(make_client):
    client = await make_client()
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert_error(await resp.json(), type="invalid_request_error", code="method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_backend_closed_on_app_cleanup():
    backend = FakeBackend()
    async with serving(TEST_CONFIG, backend):
        assert not backend.closed
    assert backend.closed


async def test_one_log_line_per_request(make_client, caplog):
    caplog.set_level("INFO", logger="proxy")
    client = await make_client(FakeBackend(script("a", "b", prompt_tokens=9)))
    resp = await client.post("/v1/chat/completions", json=TEXT_REQUEST)
    request_id = resp.headers["X-Request-Id"]
    lines = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert len(lines) == 1
    assert "200" in lines[0] and "prompt_tokens=9" in lines[0] and "completion_tokens=2" in lines[0]


def interleaved_choices() -> list[GenerationChunk]:
    """Two choices as the model streams them: chunks interleaved, each with its own end."""
    return [
        GenerationChunk("a", None, 4, 1, index=0),
        GenerationChunk("x", None, 4, 1, index=1),
        GenerationChunk("b", "length", 4, 1, index=0),
        GenerationChunk("y", None, 4, 1, index=1),
        GenerationChunk("z", "stop", 4, 1, index=1),
    ]


async def test_n_non_stream_has_one_choice_per_index_and_usage_counts_all(make_client):
    backend = FakeBackend(interleaved_choices())
    client = await make_client(backend)
    resp = await client.post("/v1/chat/completions", json={**TEXT_REQUEST, "n": 2})
    body = await resp.json()
    assert backend.last_request.sampling_parameters["n"] == 2
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "ab", "length"),
        (1, "xyz", "stop"),
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


async def test_n_stream_tags_every_chunk_with_its_choice(make_client):
    client = await make_client(FakeBackend(interleaved_choices()))
    body = {**TEXT_REQUEST, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_payloads(await (await client.post("/v1/chat/completions", json=body)).text())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    choices = [
        (c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
        for c in events[:-2]
    ]
    assert choices == [
        (0, {"role": "assistant", "content": ""}, None),
        (0, {"content": "a"}, None),
        (1, {"role": "assistant", "content": ""}, None),
        (1, {"content": "x"}, None),
        (0, {"content": "b"}, None),
        (1, {"content": "y"}, None),
        (1, {"content": "z"}, None),
        (0, {}, "length"),
        (1, {}, "stop"),
    ]
