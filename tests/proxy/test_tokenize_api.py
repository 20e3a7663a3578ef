"""`POST /tokenize` and `POST /detokenize` against a scripted backend: what reaches the model
(the chat path's translation, the task and its options) and the answers' shapes and errors."""

from __future__ import annotations

import json
import logging

import pytest
from hardening_helpers import assert_envelope
from helpers import data_url
from proxy_fakes import JPEG_BYTES, PNG_BYTES, SERVED_MODEL, FakeBackend
from tritonclient.utils import InferenceServerException

from proxy.transport.backend import model_error
from proxy.transport.contract import ModelError, PromptPart, Task, TokenizeResult


def image(detail: str | None = None, data: bytes = PNG_BYTES) -> dict:
    url = {"url": data_url(data, "image/png" if data is PNG_BYTES else "image/jpeg")}
    if detail is not None:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare."},
            image("low"),
            image("high", JPEG_BYTES),
            {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES), "max_pixels": 6272}},
        ],
    },
]
TOOLS = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]


def model_rejects(param: str) -> FakeBackend:
    error = ModelError("invalid_request", "that is not right", param).encode()
    return FakeBackend(error_at=0, error=model_error(InferenceServerException(msg=error), "r"))


async def test_messages_reach_the_model_as_a_chat_completion_would_send_them(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {"model": SERVED_MODEL, "messages": MESSAGES, "tools": TOOLS, "min_pixels": 3136}
    chat = await client.post("/v1/chat/completions", json=body)
    assert chat.status == 200
    tokenized = await client.post("/tokenize", json=body)
    assert tokenized.status == 200
    (generated, _), (asked, _) = backend.requests
    assert asked.task is Task.TOKENIZE and generated.task is Task.GENERATE
    # the same prompt: messages with every image's budget after `detail`, media, tools
    assert asked.messages_json == generated.messages_json
    assert asked.media == generated.media and len(asked.media["image"]) == 3
    assert asked.tools_json == generated.tools_json is not None
    assert asked.options.add_generation_prompt and asked.options.add_special_tokens is None
    budgets = [part for part in json.loads(asked.messages_json)[1]["content"][1:]]
    assert len({(p.get("min_pixels"), p.get("max_pixels")) for p in budgets}) == 3


async def test_the_answer_is_vllms_shape_with_the_parts(make_client):
    backend = FakeBackend()
    parts = [
        PromptPart("text", 5),
        PromptPart("image", 4, 56, 56),
        PromptPart("video", 8, 56, 56, 4),
    ]
    backend.task_answers[Task.TOKENIZE] = TokenizeResult(
        17, 2048, list(range(17)), parts, ["t"] * 17
    ).encode()
    client = await make_client(backend)
    response = await client.post(
        "/tokenize", json={"messages": MESSAGES, "return_token_strs": True}
    )
    assert response.status == 200
    assert await response.json() == {
        "count": 17,
        "max_model_len": 2048,
        "tokens": list(range(17)),
        "token_strs": ["t"] * 17,
        "parts": [
            {"type": "text", "tokens": 5},
            {"type": "image", "tokens": 4, "width": 56, "height": 56},
            {"type": "video", "tokens": 8, "width": 56, "height": 56, "frames": 4},
        ],
    }
    assert backend.last_request.options.return_token_strs


async def test_a_prompt_goes_as_text_input_with_its_options(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {"prompt": "Once upon", "add_special_tokens": False, "temperature": 0.5}
    response = await client.post("/tokenize", json=body)
    assert response.status == 200
    assert "token_strs" not in await response.json()
    sent = backend.last_request
    assert (sent.messages_json, sent.text_input, sent.input_ids) == (None, "Once upon", None)
    assert sent.options.add_special_tokens is False and sent.media == {}
    assert response.headers["X-Ignored-Fields"] == "temperature"


async def test_no_generation_prompt_when_asked(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {"messages": MESSAGES, "add_generation_prompt": False}
    assert (await client.post("/tokenize", json=body)).status == 200
    assert not backend.last_request.options.add_generation_prompt


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"messages": MESSAGES, "prompt": "x"}, 400, "invalid_value", "prompt"),
        ({"model": SERVED_MODEL}, 400, "missing_required_parameter", "messages"),
        ({"prompt": 5}, 400, "invalid_type", "prompt"),
        ({"prompt": "x", "return_token_strs": "yes"}, 400, "invalid_type", "return_token_strs"),
        ({"messages": MESSAGES, "continue_final_message": True}, 400, None, None),
        ({"messages": [{"role": "user"}]}, 400, "missing_required_parameter", None),
        ({"messages": [{"role": "user", "content": [image("huge")]}]}, 400, None, None),
        ({"prompt": "x", "model": "other"}, 404, "model_not_found", "model"),
    ],
)
async def test_bad_tokenize_requests_name_their_parameter(make_client, body, status, code, param):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post("/tokenize", json=body)
    assert response.status == status
    error = assert_envelope(await response.json(), code)
    if param is not None:
        assert error["param"] == param
    elif "continue_final_message" in body:
        assert error["param"] == "continue_final_message"
    elif "huge" in json.dumps(body):
        assert error["param"] == "messages[0].content[0].image_url.detail"
    else:
        assert error["param"] == "messages[0].content"
    assert backend.served_requests == []


async def test_the_models_errors_name_the_clients_field(make_client):
    client = await make_client(model_rejects("text_input"))
    response = await client.post("/tokenize", json={"prompt": "<|image_pad|>"})
    assert response.status == 400
    assert assert_envelope(await response.json())["param"] == "prompt"


async def test_an_unreadable_answer_is_an_internal_error(make_client):
    backend = FakeBackend()
    backend.task_answers[Task.TOKENIZE] = "not json"
    client = await make_client(backend)
    response = await client.post("/tokenize", json={"prompt": "x"})
    assert response.status == 500
    assert_envelope(await response.json(), "internal_error")


async def test_detokenize_sends_the_ids_and_answers_the_text(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post("/detokenize", json={"model": SERVED_MODEL, "tokens": [5, 6, 7]})
    assert response.status == 200
    assert await response.json() == {"prompt": "Hello world!"}
    sent = backend.last_request
    assert sent.task is Task.DETOKENIZE and sent.input_ids == (5, 6, 7)
    assert sent.messages_json is None and sent.text_input is None


async def test_detokenize_of_nothing_is_empty_text(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post("/detokenize", json={"tokens": []})
    assert await response.json() == {"prompt": ""} and backend.requests == []


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "missing_required_parameter", "tokens"),
        ({"tokens": [1, -2]}, "invalid_value", "tokens[1]"),
        ({"tokens": [1, "2"]}, "invalid_type", "tokens[1]"),
        ({"tokens": [2**40]}, "invalid_value", "tokens[0]"),
    ],
)
async def test_bad_detokenize_requests_name_their_parameter(make_client, body, code, param):
    client = await make_client(FakeBackend())
    response = await client.post("/detokenize", json=body)
    assert response.status == 400
    assert assert_envelope(await response.json(), code)["param"] == param


async def test_detokenize_model_errors_name_the_token(make_client):
    client = await make_client(model_rejects("input_ids[2]"))
    response = await client.post("/detokenize", json={"tokens": [1, 2, 999999]})
    assert response.status == 400
    assert assert_envelope(await response.json())["param"] == "tokens[2]"


async def test_the_request_log_line_names_the_route_and_model(make_client, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    client = await make_client(FakeBackend())
    headers = {"X-Request-Id": "tok-1"}
    assert (await client.post("/tokenize", json={"prompt": "x"}, headers=headers)).status == 200
    (line,) = [
        r.fields
        for r in caplog.records
        if r.name == "proxy.access" and getattr(r, "fields", {}).get("request_id") == "tok-1"
    ]
    assert (line["route"], line["model"], line["status"]) == ("/tokenize", SERVED_MODEL, 200)
