"""The OpenAI chat surface over HTTP against a scripted backend: request fields, ignored
fields, usage details, logprobs, served models and lazy loading."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from helpers import data_url, sse_payloads
from proxy_fakes import (
    JPEG_BYTES,
    PNG_BYTES,
    SERVED_MODEL,
    TRITON_MODEL,
    FakeBackend,
    logprob_entry,
    script,
)

from proxy.transport.backend import client_error, model_load_failed
from proxy.transport.contract import ModelError

TEXT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}
URL = "/v1/chat/completions"


def image_request(*urls: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}],
        **fields,
    }


async def post_json(client, body: dict, status: int = 200):
    resp = await client.post(URL, json=body)
    assert resp.status == status, await resp.text()
    return resp, await resp.json()


async def post_stream(client, body: dict):
    resp = await client.post(URL, json={**body, "stream": True})
    assert resp.status == 200, await resp.text()
    events = sse_payloads(await resp.text())
    assert events[-1] == "[DONE]"
    return resp, events[:-1]


# ---- request fields ------------------------------------------------------------------------


async def test_sampling_fields_reach_the_model_and_max_tokens_is_clamped(make_client):
    backend = FakeBackend()
    client = await make_client(backend, max_tokens_limit=100)
    body = {
        **TEXT_REQUEST,
        "max_tokens": 50,
        "max_completion_tokens": 500,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 11,
        "stop": ["</s>", "END"],
        "logprobs": True,
        "top_logprobs": 4,
        "n": 1,
        "user": "alice",
        "response_format": {"type": "text"},
    }
    await post_json(client, body)
    assert backend.last_request.sampling_parameters == {
        "max_tokens": 100,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 11,
        "stop": ["</s>", "END"],
        "logprobs": True,
        "top_logprobs": 4,
    }


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"n": 0}, "n", "invalid_value"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"stop": [str(i) for i in range(17)]}, "stop", "invalid_value"),
        ({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
        ({"max_pixels": 10**8}, "max_pixels", "invalid_value"),
    ],
)
async def test_bad_fields_are_400_and_never_reach_the_model(make_client, fields, param, code):
    backend = FakeBackend()
    client = await make_client(backend)
    _, body = await post_json(client, {**TEXT_REQUEST, **fields}, status=400)
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)
    assert backend.requests == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "something_new"},
    ],
)
async def test_unsupported_content_parts_are_400_naming_the_part(make_client, part):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "t"}, part]},
        ]
    }
    _, error = await post_json(client, body, status=400)
    assert error["error"]["param"] == "messages[1].content[1]"
    assert error["error"]["code"] == "unsupported_content_type"
    assert part["type"] in error["error"]["message"]
    assert backend.requests == []


async def test_images_across_turns_keep_order_and_budgets(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": data_url(PNG_BYTES), "detail": "low"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(JPEG_BYTES, "image/jpeg")}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "both?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": data_url(PNG_BYTES), "max_pixels": 100352},
                    },
                ],
            },
        ],
        "min_pixels": 6272,
    }
    await post_json(client, body)
    sent = backend.last_request
    assert sent.media["image"] == [PNG_BYTES, JPEG_BYTES, PNG_BYTES]
    images = [
        part
        for message in json.loads(sent.messages_json)
        for part in message["content"]
        if part["type"] == "image"
    ]
    assert images == [
        {"type": "image", "min_pixels": 6272, "max_pixels": 200704},
        {"type": "image", "min_pixels": 6272, "max_pixels": 1003520},
        {"type": "image", "min_pixels": 6272, "max_pixels": 100352},
    ]


# ---- ignored fields and the user -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_fields_are_named_in_a_header_and_the_log(make_client, caplog, stream):
    caplog.set_level(logging.INFO, logger="proxy")
    client = await make_client()
    body = {
        **TEXT_REQUEST,
        "service_tier": "auto",
        "prediction": {"type": "content", "content": "x"},
        "stream": stream,
        "metadata": {"a": "b"},
    }
    resp = await client.post(URL, json=body)
    assert resp.status == 200
    await resp.read()
    assert resp.headers["X-Ignored-Fields"] == "service_tier, prediction, metadata"
    request_id = resp.headers["X-Request-Id"]
    lines = [r.getMessage() for r in caplog.records if "ignored fields" in r.getMessage()]
    assert lines and request_id in lines[0] and "prediction" in lines[0]


async def test_ignored_field_names_are_made_header_safe(make_client):
    client = await make_client()
    body = {**TEXT_REQUEST, "evil\r\nSet-Cookie: x": 1, "a,b": 2, "ü": 3}
    body.update({f"f{i}": i for i in range(40)})
    resp, _ = await post_json(client, body)
    header = resp.headers["X-Ignored-Fields"]
    assert "\r" not in header and "\n" not in header
    assert "Set-Cookie" not in resp.headers
    names = header.split(", ")
    assert names[:3] == ["evil??Set-Cookie:?x", "a?b", "?"]
    assert names[-1] == "... (11 more)"


async def test_user_is_accepted_and_logged(make_client, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    client = await make_client()
    resp, _ = await post_json(client, {**TEXT_REQUEST, "user": "user-1234"})
    assert "X-Ignored-Fields" not in resp.headers
    assert any("user='user-1234'" in r.getMessage() for r in caplog.records)


# ---- usage details -------------------------------------------------------------------------


async def test_image_tokens_are_in_usage_identically_in_both_modes(make_client):
    chunks = script("a", "b", "c", prompt_tokens=300, image_tokens=256)
    client = await make_client(FakeBackend(chunks))
    body = image_request(data_url(PNG_BYTES), stream_options={"include_usage": True})

    _, completion = await post_json(client, body)
    _, events = await post_stream(client, body)

    expected = {
        "prompt_tokens": 300,
        "completion_tokens": 3,
        "total_tokens": 303,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 256},
    }
    assert completion["usage"] == expected
    assert events[-1]["choices"] == [] and events[-1]["usage"] == expected


async def test_usage_has_no_details_when_the_model_does_not_report_image_tokens(make_client):
    client = await make_client(FakeBackend(script("a", prompt_tokens=5)))
    _, completion = await post_json(client, TEXT_REQUEST)
    assert "prompt_tokens_details" not in completion["usage"]


# ---- logprobs ------------------------------------------------------------------------------


async def test_non_stream_logprobs_concatenate_every_chunk(make_client):
    client = await make_client(FakeBackend(script("Hel", "lo", "!", logprobs=True)))
    _, completion = await post_json(client, {**TEXT_REQUEST, "logprobs": True, "top_logprobs": 2})
    assert completion["choices"][0]["logprobs"] == {
        "content": [logprob_entry("Hel", 0.0), logprob_entry("lo", -0.5), logprob_entry("!", -1.0)]
    }


async def test_stream_logprobs_ride_on_their_chunks(make_client):
    client = await make_client(FakeBackend(script("Hel", "lo", logprobs=True)))
    _, events = await post_stream(client, {**TEXT_REQUEST, "logprobs": True})
    assert [e["choices"][0]["logprobs"] for e in events] == [
        None,  # the role chunk
        {"content": [logprob_entry("Hel", 0.0)]},
        {"content": [logprob_entry("lo", -0.5)]},
        None,  # the finish chunk
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_are_null_when_not_requested(make_client, stream):
    # Even if a model sends them, a client that did not ask gets null.
    client = await make_client(FakeBackend(script("a", "b", logprobs=True)))
    if stream:
        _, events = await post_stream(client, TEXT_REQUEST)
        assert all(e["choices"][0]["logprobs"] is None for e in events)
    else:
        _, completion = await post_json(client, TEXT_REQUEST)
        assert completion["choices"][0]["logprobs"] is None


# ---- models --------------------------------------------------------------------------------

MAPPED = {"model_map": (("qwen-alias", TRITON_MODEL), ("qwen-small", "qwen_small"))}


async def test_model_selects_the_triton_model_and_is_echoed(make_client):
    backend = FakeBackend(models={TRITON_MODEL: "READY", "qwen_small": "READY"})
    client = await make_client(backend, **MAPPED)

    _, completion = await post_json(client, {**TEXT_REQUEST, "model": "qwen-small"})
    assert completion["model"] == "qwen-small"
    assert backend.last_request.model == "qwen_small"

    _, completion = await post_json(client, {**TEXT_REQUEST, "model": "qwen-alias"})
    assert (completion["model"], backend.last_request.model) == ("qwen-alias", TRITON_MODEL)

    _, completion = await post_json(client, TEXT_REQUEST)  # no model: the default
    assert (completion["model"], backend.last_request.model) == (SERVED_MODEL, TRITON_MODEL)


async def test_unknown_model_is_404_listing_served_names(make_client):
    backend = FakeBackend()
    client = await make_client(backend, **MAPPED)
    _, error = await post_json(client, {**TEXT_REQUEST, "model": "gpt-4o"}, status=404)
    assert (error["error"]["code"], error["error"]["param"]) == ("model_not_found", "model")
    assert "qwen-alias" in error["error"]["message"]
    assert backend.served_requests == []


async def test_models_lists_only_names_whose_triton_model_is_in_the_repository(make_client):
    backend = FakeBackend(models={TRITON_MODEL: "READY"})  # qwen_small is not in the repository
    client = await make_client(backend, **MAPPED)
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == [SERVED_MODEL, "qwen-alias"]
    assert (await client.get("/v1/models/qwen-alias")).status == 200
    resp = await client.get("/v1/models/qwen-small")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_models_lists_unloaded_models_too(make_client):
    # Explicit model control: in the index with no state until loaded.
    client = await make_client(FakeBackend(models={TRITON_MODEL: ""}), **MAPPED)
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == [SERVED_MODEL, "qwen-alias"]


async def test_models_fall_back_to_the_configured_list_when_the_index_fails(make_client):
    client = await make_client(FakeBackend(models=RuntimeError("triton down")), **MAPPED)
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == [SERVED_MODEL, "qwen-alias", "qwen-small"]
    assert (await client.get("/v1/models/qwen-small")).status == 200


# ---- lazy loading --------------------------------------------------------------------------


async def test_concurrent_first_requests_cause_exactly_one_load(make_client):
    backend = FakeBackend(ready=False)
    backend.load_delay_s = 0.3
    client = await make_client(backend, lazy_load=True)

    resp = await client.get("/ready")
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert (error["code"], error["type"]) == ("model_not_loaded", "service_unavailable")
    assert error["message"] == "model not loaded yet (lazy loading: the first request loads it)"

    bodies = [TEXT_REQUEST, {**TEXT_REQUEST, "stream": True}] * 3
    responses = await asyncio.gather(*(client.post(URL, json=body) for body in bodies))
    assert [r.status for r in responses] == [200] * 6
    assert backend.load_calls == [TRITON_MODEL]
    assert len(backend.requests) == 6

    assert (await client.get("/ready")).status == 200
    await post_json(client, TEXT_REQUEST)
    assert backend.load_calls == [TRITON_MODEL]


async def test_lazy_load_of_an_already_loaded_model_does_not_reload(make_client):
    backend = FakeBackend(ready=True)
    client = await make_client(backend, lazy_load=True)
    await post_json(client, TEXT_REQUEST)
    assert backend.load_calls == []


async def test_failed_load_is_503_and_the_next_request_retries(make_client):
    backend = FakeBackend(ready=False)
    backend.load_error = model_load_failed()
    client = await make_client(backend, lazy_load=True)

    _, error = await post_json(client, TEXT_REQUEST, status=503)
    assert error["error"]["code"] == "model_load_failed"
    assert backend.requests == []
    assert (await client.get("/ready")).status == 503

    await post_json(client, TEXT_REQUEST)
    assert backend.load_calls == [TRITON_MODEL, TRITON_MODEL]
    assert (await client.get("/ready")).status == 200


async def test_load_wait_is_bounded_and_the_load_goes_on(make_client):
    backend = FakeBackend(ready=False)
    backend.load_delay_s = 0.6
    client = await make_client(backend, lazy_load=True, load_timeout_s=0.1)

    _, error = await post_json(client, TEXT_REQUEST, status=503)
    assert error["error"]["code"] == "model_loading"
    await asyncio.sleep(0.7)
    await post_json(client, TEXT_REQUEST)
    assert backend.load_calls == [TRITON_MODEL]


async def test_lazy_load_loads_the_requested_model(make_client):
    backend = FakeBackend(ready=False, models={TRITON_MODEL: "", "qwen_small": ""})
    client = await make_client(backend, lazy_load=True, **MAPPED)
    await post_json(client, {**TEXT_REQUEST, "model": "qwen-small"})
    assert backend.load_calls == ["qwen_small"]


async def test_without_lazy_load_nothing_is_loaded_and_ready_says_not_ready(make_client):
    backend = FakeBackend(ready=False)
    client = await make_client(backend)
    resp = await client.get("/ready")
    assert (await resp.json())["error"]["code"] == "model_not_ready"
    await post_json(client, TEXT_REQUEST)
    assert backend.load_calls == []


# ---- model errors --------------------------------------------------------------------------


async def test_other_model_error_params_pass_through(make_client):
    error = client_error(
        ModelError("invalid_request", "too long", "max_tokens", "context_length_exceeded")
    )
    client = await make_client(FakeBackend(error_at=0, error=error))
    _, envelope = await post_json(client, TEXT_REQUEST, status=400)
    assert envelope["error"] == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "context_length_exceeded",
    }
