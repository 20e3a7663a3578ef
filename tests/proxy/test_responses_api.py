"""`POST /v1/responses` (proxy/api/responses/protocol.py) against the scripted backend: the official
SDK's `client.responses.create`, stream and not, the events in order, the translation into
the chat path (instructions, formats, tools, images), and its errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from helpers import data_url
from proxy_fakes import JPEG_BYTES, PNG_BYTES, SERVED_MODEL, FakeBackend, script

from proxy.transport.backend import client_error
from proxy.transport.contract import ModelError

IMAGE_INPUT = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is in this image?"},
            {"type": "input_image", "image_url": data_url(JPEG_BYTES, "image/jpeg")},
        ],
    }
]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture
async def sdk(make_client):
    """`await sdk(backend, **config)`: an AsyncOpenAI client for a fresh app."""
    clients: list[httpx.AsyncClient] = []

    async def make(backend: FakeBackend, **config: Any) -> openai.AsyncOpenAI:
        server = await make_client(backend, **config)
        http = httpx.AsyncClient(trust_env=False)
        clients.append(http)
        return openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0, http_client=http
        )

    yield make
    for http in clients:
        await http.aclose()


async def create(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """The response, or the list of events when streaming."""
    result = await client.responses.create(**kwargs)
    return [event async for event in result] if kwargs.get("stream") else result


async def post_raw(make_client, body: dict, backend: FakeBackend | None = None):
    client = await make_client(backend or FakeBackend())
    return await client.post("/v1/responses", json=body)


def sse_events(raw: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a Responses stream."""
    assert raw.endswith("\n\n"), raw
    events = []
    for block in raw.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        events.append((data["type"], data))
    return events


# ---- the SDK, non-stream and stream --------------------------------------------------------


async def test_sdk_non_stream_text(sdk):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20))
    client = await sdk(backend)

    response = await create(client, model=SERVED_MODEL, input="Describe a cat.")

    assert response.output_text == "A cat."
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None
    assert response.model == SERVED_MODEL
    (message,) = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (20, 3, 23)
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.incomplete_details is None
    assert response.store is False and response.parallel_tool_calls is True
    assert json.loads(backend.last_request.messages_json) == [
        {"role": "user", "content": "Describe a cat."}
    ]


async def test_sdk_non_stream_with_an_image(sdk):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20, image_tokens=4))
    client = await sdk(backend)

    response = await create(
        client,
        model=SERVED_MODEL,
        input=IMAGE_INPUT,
        max_output_tokens=16,
        temperature=0.2,
        top_p=0.9,
        metadata={"trace": "t-1"},
    )

    assert response.output_text == "A cat."
    assert backend.last_request.media["image"] == [JPEG_BYTES]
    assert backend.last_request.sampling_parameters == {
        "max_tokens": 16,
        "temperature": 0.2,
        "top_p": 0.9,
    }
    assert json.loads(backend.last_request.messages_json)[0]["content"][0] == {
        "type": "text",
        "text": "What is in this image?",
    }
    assert (response.max_output_tokens, response.temperature, response.top_p) == (16, 0.2, 0.9)
    assert response.metadata == {"trace": "t-1"}
    assert response.usage.input_tokens_details.image_tokens == 4


async def test_sdk_stream_with_an_image_events_in_order(sdk):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20, image_tokens=4))
    client = await sdk(backend)

    events = await create(client, model=SERVED_MODEL, input=IMAGE_INPUT, stream=True)

    assert [e.type for e in events] == [*TEXT_EVENTS, "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "A cat."
    created, done = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert done.id == created.id and done.status == "completed"
    assert done.output_text == "A cat."
    assert (done.usage.input_tokens, done.usage.output_tokens) == (20, 3)
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {done.output[0].id}
    assert events[7].text == "A cat." and events[8].part.text == "A cat."
    assert events[9].item.status == "completed"
    assert backend.last_request.media["image"] == [JPEG_BYTES]


async def test_the_stream_is_typed_events_ending_with_the_terminal_one(make_client):
    client = await make_client(FakeBackend(script("A", " cat", ".")))
    resp = await client.post("/v1/responses", json={"input": "hi", "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    raw = await resp.text()
    assert "[DONE]" not in raw
    names = [name for name, _ in sse_events(raw)]
    assert names == [*TEXT_EVENTS, "response.completed"]


async def test_usage_equals_chat_completions_usage_for_the_same_input(make_client):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20, image_tokens=4))
    client = await make_client(backend)
    chat_messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": data_url(JPEG_BYTES, "image/jpeg")}},
            ],
        }
    ]
    chat = await (
        await client.post("/v1/chat/completions", json={"messages": chat_messages})
    ).json()
    chat_sent = backend.last_request
    for stream in (False, True):
        resp = await client.post("/v1/responses", json={"input": IMAGE_INPUT, "stream": stream})
        if stream:
            body = sse_events(await resp.text())[-1][1]["response"]
        else:
            body = await resp.json()
        usage = body["usage"]
        assert usage["input_tokens"] == chat["usage"]["prompt_tokens"]
        assert usage["output_tokens"] == chat["usage"]["completion_tokens"]
        assert usage["total_tokens"] == chat["usage"]["total_tokens"]
        assert usage["input_tokens_details"]["image_tokens"] == 4
        # The same request reached the model.
        assert backend.last_request.messages_json == chat_sent.messages_json
        assert backend.last_request.media == chat_sent.media


# ---- the request's translation -------------------------------------------------------------


async def test_instructions_are_the_system_message_the_model_gets(sdk):
    backend = FakeBackend()
    client = await sdk(backend)
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again"}]},
    ]
    response = await create(client, input=history, instructions="You are a cat.")
    assert json.loads(backend.last_request.messages_json) == [
        {"role": "system", "content": "You are a cat."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    assert response.instructions == "You are a cat."


async def test_text_format_json_schema_reaches_the_model_as_the_constraint(sdk):
    backend = FakeBackend(script('{"a": 1}'))
    client = await sdk(backend)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}}

    response = await create(client, input="A number.", text=text)

    assert backend.last_request.sampling_parameters["structured"] == {
        "type": "json_schema",
        "schema": schema,
        "strict": True,
    }
    assert json.loads(response.output_text) == {"a": 1}
    assert response.text.format.type == "json_schema" and response.text.format.name == "A"
    await create(client, input="JSON.", text={"format": {"type": "json_object"}})
    assert backend.last_request.sampling_parameters["structured"]["type"] == "json_object"


async def test_a_function_call_becomes_a_function_call_item(sdk):
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    backend = FakeBackend(script(call_text))
    client = await sdk(backend)

    response = await create(client, input="Weather in Paris?", tools=[WEATHER_TOOL])

    (item,) = response.output
    assert (item.type, item.name, json.loads(item.arguments)) == (
        "function_call",
        "get_weather",
        {"city": "Paris"},
    )
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    assert item.status == "completed"
    sent = json.loads(backend.last_request.tools_json)
    assert sent == [
        {
            "type": "function",
            "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"},
        }
    ]
    assert response.tools[0].name == "get_weather" and response.tool_choice == "auto"


async def test_a_streamed_function_call_after_text(sdk):
    backend = FakeBackend(
        script("Checking.", '<tool_call>{"name": "get_weather", ', '"arguments": {"city": "P"}}')
        + script("</tool_call>")
    )
    client = await sdk(backend)

    events = await create(
        client, input="Weather?", tools=[WEATHER_TOOL], tool_choice="auto", stream=True
    )

    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[8]
    assert (added.output_index, added.item.type, added.item.arguments) == (1, "function_call", "")
    assert json.loads(events[10].arguments) == {"city": "P"} and events[10].name == "get_weather"
    done = events[-1].response
    assert [item.type for item in done.output] == ["message", "function_call"]
    assert done.output_text == "Checking."
    assert done.output[1].call_id == events[11].item.call_id


async def test_forced_tool_choice_and_history_of_calls(sdk):
    backend = FakeBackend(script("It is sunny."))
    client = await sdk(backend)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    await create(
        client,
        input=history,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    messages = json.loads(backend.last_request.messages_json)
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert backend.last_request.sampling_parameters["structured"]["type"] == "tool_calls"


async def test_cut_by_length_is_incomplete(sdk):
    backend = FakeBackend(script("A", " cat", finish_reason="length"))
    client = await sdk(backend)

    response = await create(client, input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"

    events = await create(client, input="Hi", max_output_tokens=2, stream=True)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


async def test_without_state_store_true_is_answered_as_not_stored(make_client):
    """TEST_CONFIG runs without state (--no-state): nothing is kept, and the answer says so.
    Stored responses: tests/proxy/test_stored_responses.py."""
    for stream in (False, True):
        resp = await post_raw(make_client, {"input": "Hi", "store": True, "stream": stream})
        assert resp.status == 200
        assert resp.headers["X-Response-Stored"] == "false"
        body = await resp.json() if not stream else sse_events(await resp.text())[-1][1]["response"]
        assert body["store"] is False


async def test_unknown_fields_are_listed_as_ignored(make_client):
    resp = await post_raw(
        make_client,
        {"input": "Hi", "reasoning": {"effort": "low"}, "text": {"verbosity": "low"}},
    )
    assert resp.status == 200
    assert resp.headers["X-Ignored-Fields"] == "reasoning, text.verbosity"


# ---- errors ---------------------------------------------------------------------------------


async def test_conversation_is_refused(make_client):
    backend = FakeBackend()
    resp = await post_raw(make_client, {"input": "Hi", "conversation": "conv_123"}, backend)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "unsupported_parameter",
        "conversation",
        "invalid_request_error",
    )
    assert "previous_response_id" in error["message"]
    assert backend.requests == []


@pytest.mark.parametrize(
    "field, value", [("previous_response_id", "resp_123"), ("background", True)]
)
async def test_without_state_stateful_fields_are_501(make_client, field, value):
    backend = FakeBackend()
    resp = await post_raw(make_client, {"input": "Hi", field: value}, backend)
    assert resp.status == 501
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("state_disabled", field)
    assert "--no-state" in error["message"]
    assert backend.requests == []


async def test_without_state_an_image_file_id_is_501(make_client):
    backend = FakeBackend()
    part = {"type": "input_image", "file_id": "file-abc"}
    resp = await post_raw(make_client, {"input": [{"role": "user", "content": [part]}]}, backend)
    assert resp.status == 501
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("state_disabled", "input[0].content[0].file_id")
    assert backend.requests == []


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"input": 5}, "invalid_type", "input"),
        ({"input": []}, "invalid_value", "input"),
        ({"input": "Hi", "temperature": "hot"}, "invalid_type", "temperature"),
        ({"input": "Hi", "max_output_tokens": 0}, "invalid_value", "max_output_tokens"),
        ({"input": "Hi", "stream": "yes"}, "invalid_type", "stream"),
        ({"input": "Hi", "metadata": {"a": 1}}, "invalid_type", "metadata.a"),
        ({}, "missing_required_parameter", "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "unsupported_content_type",
            "input[0].content[0]",
        ),
        ({"input": [{"type": "reasoning", "id": "r"}]}, "invalid_value", "input[0]"),
        ({"input": [{"role": "robot", "content": "x"}]}, "invalid_value", "input[0].role"),
        (
            {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "A"}}},
            "invalid_value",
            "text.format",
        ),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "invalid_value", "tools[0].type"),
        ({"input": "Hi", "tool_choice": "required"}, "invalid_value", "tool_choice"),
        ({"input": "Hi", "model": "gpt-4"}, "model_not_found", "model"),
        (
            {"input": "Hi", "background": True, "stream": True},
            "unsupported_parameter",
            "stream",
        ),
        ({"input": "Hi", "background": True, "store": False}, "invalid_value", "store"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "missing_required_parameter",
            "input[0].content[0].image_url",
        ),
        (
            {"input": "Hi", "metadata": {str(i): "v" for i in range(17)}},
            "invalid_value",
            "metadata",
        ),
    ],
)
async def test_bad_requests_get_openai_error_envelopes(make_client, body, code, param):
    backend = FakeBackend()
    resp = await post_raw(make_client, body, backend)
    envelope = await resp.json()
    assert resp.status in (400, 404), envelope
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
    assert (envelope["error"]["code"], envelope["error"]["param"]) == (code, param), envelope
    assert backend.served_requests == []


async def test_a_bad_image_names_the_clients_path(make_client):
    backend = FakeBackend()
    body = {
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "First"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "This?"},
                    {"type": "input_image", "image_url": data_url(b"not an image at all")},
                ],
            },
        ],
    }
    for stream in (False, True):
        resp = await post_raw(make_client, {**body, "stream": stream}, backend)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_image"
        assert error["param"] == "input[1].content[1].image_url"
    assert backend.requests == []


async def test_the_models_error_before_the_first_event_is_an_http_error(make_client):
    error = client_error(
        ModelError("invalid_request", "too long", "messages[1].content", "context_length_exceeded")
    )
    backend = FakeBackend(script("a"), error_at=0, error=error)
    body = {"instructions": "x", "input": "Hi", "stream": True}
    resp = await post_raw(make_client, body, backend)
    assert resp.status == 400
    envelope = await resp.json()
    assert envelope["error"]["code"] == "context_length_exceeded"
    assert envelope["error"]["param"] == "input"


async def test_a_failure_mid_stream_is_response_failed(make_client):
    backend = FakeBackend(script("a", "b", "c"), error_at=2, error=RuntimeError("secret boom"))
    resp = await post_raw(make_client, {"input": "Hi", "stream": True}, backend)
    assert resp.status == 200
    raw = await resp.text()
    events = sse_events(raw)
    name, data = events[-1]
    assert name == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"]["code"] == "internal_error"
    assert data["response"]["output"][0]["content"][0]["text"] == "ab"
    assert "secret" not in raw


async def test_sdk_stream_failure_is_an_event_not_an_exception(sdk):
    client = await sdk(FakeBackend(script("a", "b"), error_at=1, error=RuntimeError("x")))
    events = await create(client, input="Hi", stream=True)
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.message.startswith("internal server error")


async def test_client_disconnect_mid_stream_cancels_the_backend(make_client):
    backend = FakeBackend(script(*(f"t{i}" for i in range(100))), delay_s=0.05)
    client = await make_client(backend)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            str(client.make_url("/v1/responses")), json={"input": "Hi", "stream": True}
        )
        assert resp.status == 200
        await resp.content.readuntil(b'"delta":"t0"')
        resp.close()
    await asyncio.wait_for(backend.stopped_early.wait(), 2.0)
    assert not backend.finished


async def test_a_png_by_data_url_without_detail_and_with_original(sdk):
    backend = FakeBackend()
    client = await sdk(backend)
    parts = [
        {"type": "input_image", "image_url": data_url(PNG_BYTES)},
        {"type": "input_image", "image_url": data_url(PNG_BYTES), "detail": "original"},
    ]
    await create(client, input=[{"role": "user", "content": parts}])
    assert backend.last_request.media["image"] == [PNG_BYTES, PNG_BYTES]


async def test_a_previous_responses_output_is_history_for_the_next(sdk):
    """Stateless multi-turn: the client sends the earlier output back in `input`."""
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    backend = FakeBackend(script("Let me check.", call_text))
    client = await sdk(backend)
    first = await create(client, input="Weather in Paris?", tools=[WEATHER_TOOL])
    assert [item.type for item in first.output] == ["message", "function_call"]
    call = first.output[1]

    backend.chunks = script("It is sunny.")
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump() for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    second = await create(client, input=history, tools=[WEATHER_TOOL])

    assert second.output_text == "It is sunny."
    messages = json.loads(backend.last_request.messages_json)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "tool"]
    assert messages[1]["content"] == [{"type": "text", "text": "Let me check."}]
    assert messages[2]["tool_calls"][0]["id"] == call.call_id
    assert messages[3]["tool_call_id"] == call.call_id
