"""`POST /v1/messages` (proxy/api/messages/) against the scripted backend with the official
`anthropic` SDK: `messages.create` and `messages.stream`, images, a tool round trip, stop
reasons, and its errors in Anthropic's envelope (the SDK's exception types), x-api-key."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import anthropic
import httpx2
import pytest
from hardening_helpers import assert_no_leak
from proxy_fakes import (
    JPEG_BYTES,
    PNG_BYTES,
    SERVED_MODEL,
    TEST_CONFIG,
    FakeBackend,
    script,
    serving,
)
from tritonclient.utils import InferenceServerException

from proxy.transport.backend import GenerationChunk, model_error
from proxy.transport.contract import ModelError

MESSAGES = "/v1/messages"
KEY = "sk-test-anthropic"
HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def image_block(data: bytes, media_type: str) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": encoded},
    }


@pytest.fixture
async def sdk(make_client):
    """`await sdk(backend, **config)`: an AsyncAnthropic client for a fresh app (the key is
    sent as the SDK sends it: a Bearer token in this version; x-api-key is tested raw)."""
    clients: list[httpx2.AsyncClient] = []

    async def make(backend: FakeBackend | None = None, **config: Any) -> anthropic.AsyncAnthropic:
        server = await make_client(backend or FakeBackend(), **config)
        http = httpx2.AsyncClient(trust_env=False)  # no proxy env vars on loopback
        clients.append(http)
        return anthropic.AsyncAnthropic(
            base_url=str(server.make_url("")), api_key=KEY, max_retries=0, http_client=http
        )

    yield make
    for http in clients:
        await http.aclose()


def sent_messages(backend: FakeBackend) -> list[dict[str, Any]]:
    return json.loads(backend.last_request.messages_json)


def sse_events(raw: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event: an `event:` line, then its `data:` line."""
    assert raw.endswith("\n\n"), raw
    events = []
    for block in raw.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        events.append((data["type"], data))
    return events


def busy() -> Exception:
    return model_error(InferenceServerException(msg=ModelError("busy", "queue full").encode()), "r")


# ---- messages.create and messages.stream ---------------------------------------------------


async def test_create_text_with_system_and_sampling(sdk):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20))
    client = await sdk(backend)

    message = await client.messages.create(
        model=SERVED_MODEL,
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "Describe a cat."}],
        # this SDK version has no sampling arguments; clients of older ones send them
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20},
        stop_sequences=["END", "\n\n"],
        metadata={"user_id": "u-1"},
    )

    assert message.id.startswith("msg_") and message.type == "message"
    assert (message.role, message.model) == ("assistant", SERVED_MODEL)
    assert [(block.type, block.text) for block in message.content] == [("text", "A cat.")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (20, 3)
    assert sent_messages(backend) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe a cat."},
    ]
    assert backend.last_request.sampling_parameters == {
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "stop": ["END", "\n\n"],
    }
    assert backend.last_request.stream is False


async def test_stream_events_in_order_and_the_final_message(sdk):
    backend = FakeBackend(script("Hel", "lo", " there", prompt_tokens=9))
    client = await sdk(backend)

    async with client.messages.stream(model=SERVED_MODEL, max_tokens=32, messages=HI) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()

    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [(block.type, block.text) for block in final.content] == [("text", "Hello there")]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 3)
    assert backend.last_request.stream is True


async def test_the_raw_stream_is_anthropics_typed_events(make_client):
    client = await make_client(FakeBackend(script("a", "b", prompt_tokens=5)))
    response = await client.post(MESSAGES, json={"max_tokens": 8, "stream": True, "messages": HI})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = sse_events(await response.text())
    assert [kind for kind, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5 and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "a"}
    assert events[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6][1]["usage"] == {"output_tokens": 2}


async def test_create_and_stream_with_a_base64_image(sdk):
    backend = FakeBackend(script("A", " dot", prompt_tokens=30, image_tokens=4))
    client = await sdk(backend)
    content = [
        {"type": "text", "text": "What is this?"},
        image_block(PNG_BYTES, "image/png"),
    ]

    message = await client.messages.create(
        model=SERVED_MODEL, max_tokens=16, messages=[{"role": "user", "content": content}]
    )
    assert message.content[0].text == "A dot"
    assert message.usage.input_tokens == 30  # image tokens are input tokens
    assert backend.last_request.media == {"image": [PNG_BYTES]}
    (user,) = sent_messages(backend)
    assert user["content"][0] == {"type": "text", "text": "What is this?"}
    assert user["content"][1]["type"] == "image"

    jpeg = [image_block(JPEG_BYTES, "image/jpeg"), {"type": "text", "text": "And this?"}]
    async with client.messages.stream(
        model=SERVED_MODEL, max_tokens=16, messages=[{"role": "user", "content": jpeg}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "A dot"
    assert backend.last_request.media == {"image": [JPEG_BYTES]}


async def test_an_image_by_url_is_fetched_by_the_proxy():
    class Fetcher:
        def __init__(self) -> None:
            self.urls: list[str] = []

        async def fetch_all(self, refs):
            self.urls += [ref.url for ref in refs]
            return [PNG_BYTES for _ in refs]

    fetcher, backend = Fetcher(), FakeBackend()
    block = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    body = {"max_tokens": 8, "messages": [{"role": "user", "content": [block]}]}
    async with serving(TEST_CONFIG, backend, fetcher=fetcher) as client:
        response = await client.post(MESSAGES, json=body)
        assert response.status == 200, await response.text()
    assert fetcher.urls == ["https://example.com/a.png"]
    assert backend.last_request.media == {"image": [PNG_BYTES]}


# ---- tools -----------------------------------------------------------------------------------


async def test_a_tool_round_trip(sdk):
    backend = FakeBackend(script("Let me check.", WEATHER_CALL, prompt_tokens=40))
    client = await sdk(backend)
    question = {"role": "user", "content": "Weather in Paris?"}

    first = await client.messages.create(
        model=SERVED_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=[question]
    )
    assert first.stop_reason == "tool_use"
    text, call = first.content
    assert (text.type, text.text) == ("text", "Let me check.")
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert call.id.startswith("toolu_")
    tools = json.loads(backend.last_request.tools_json)
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER_TOOL["input_schema"],
                "description": "The weather in a city",
            },
        }
    ]

    backend.chunks = script("It is sunny.")
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}
    second = await client.messages.create(
        model=SERVED_MODEL,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [result, {"type": "text", "text": "Summarize."}]},
        ],
    )
    assert second.content[0].text == "It is sunny." and second.stop_reason == "end_turn"
    assert sent_messages(backend)[1:] == [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Let me check."}],
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": call.id},
        {"role": "user", "content": [{"type": "text", "text": "Summarize."}]},
    ]


async def test_a_streamed_tool_use_is_one_input_json_delta(sdk):
    backend = FakeBackend(script("Checking", WEATHER_CALL[:20], WEATHER_CALL[20:]))
    client = await sdk(backend)

    async with client.messages.stream(
        model=SERVED_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=HI
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()

    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == 1]
    assert [(d.type, json.loads(d.partial_json)) for d in deltas] == [
        ("input_json_delta", {"city": "Paris"})
    ]
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]


async def test_a_tool_result_with_an_image(sdk):
    backend = FakeBackend(script("A chart."))
    client = await sdk(backend)
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "the chart:"}, image_block(PNG_BYTES, "image/png")],
    }
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "X"}}
    await client.messages.create(
        model=SERVED_MODEL,
        max_tokens=8,
        tools=[WEATHER_TOOL],
        messages=[
            *HI,
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ],
    )
    assistant, tool = sent_messages(backend)[1:]
    assert assistant["content"] == "" and assistant["tool_calls"][0]["id"] == "toolu_1"
    assert tool["role"] == "tool" and tool["tool_call_id"] == "toolu_1"
    assert tool["content"][0] == {"type": "text", "text": "the chart:"}
    assert tool["content"][1]["type"] == "image"
    assert backend.last_request.media == {"image": [PNG_BYTES]}


@pytest.mark.parametrize(
    ("choice", "constraint_tools", "in_prompt"),
    [
        ({"type": "auto"}, None, True),
        ({"type": "any"}, ["get_weather"], True),
        ({"type": "tool", "name": "get_weather"}, ["get_weather"], True),
        ({"type": "none"}, None, False),
    ],
)
async def test_tool_choice_reaches_the_model(sdk, choice, constraint_tools, in_prompt):
    backend = FakeBackend(script("ok"))
    client = await sdk(backend)
    await client.messages.create(
        model=SERVED_MODEL, max_tokens=8, tools=[WEATHER_TOOL], tool_choice=choice, messages=HI
    )
    structured = backend.last_request.sampling_parameters.get("structured")
    forced = None if structured is None else [tool["name"] for tool in structured["tools"]]
    assert forced == constraint_tools
    assert (backend.last_request.tools_json is not None) == in_prompt


async def test_disable_parallel_tool_use_forces_a_single_call(sdk):
    backend = FakeBackend(script("ok"))
    client = await sdk(backend)
    choice = {"type": "any", "disable_parallel_tool_use": True}
    await client.messages.create(
        model=SERVED_MODEL, max_tokens=8, tools=[WEATHER_TOOL], tool_choice=choice, messages=HI
    )
    assert backend.last_request.sampling_parameters["structured"]["parallel"] is False


# ---- stop reasons ----------------------------------------------------------------------------


def ended_by(stop: str) -> list[GenerationChunk]:
    *first, last = script("Once", " upon")
    # the model reports which stop string ended the choice
    return [*first, dataclasses.replace(last, stop_reason=stop)]


async def test_a_stop_sequence_is_reported_stream_and_not(sdk):
    client = await sdk(FakeBackend(ended_by("END")))
    kwargs = {"model": SERVED_MODEL, "max_tokens": 8, "stop_sequences": ["END"], "messages": HI}

    message = await client.messages.create(**kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    async with client.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


async def test_cut_by_length_is_max_tokens(sdk):
    client = await sdk(FakeBackend(script("a", "b", finish_reason="length")))
    message = await client.messages.create(model=SERVED_MODEL, max_tokens=2, messages=HI)
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 2)


async def test_nothing_said_is_empty_content(make_client):
    client = await make_client(FakeBackend(script("")))
    response = await client.post(MESSAGES, json={"max_tokens": 8, "messages": HI})
    assert (await response.json())["content"] == []


# ---- errors: Anthropic's envelope, the SDK's exception types ---------------------------------


def assert_anthropic_error(body: dict, error_type: str) -> str:
    assert set(body) == {"type", "error", "request_id"}, body
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type, body
    assert_no_leak(body["error"]["message"])
    return body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"messages": HI}, "max_tokens"),  # Anthropic requires it
        ({"max_tokens": 0, "messages": HI}, "max_tokens"),
        ({"max_tokens": 8, "messages": HI, "temperature": 1.5}, "temperature"),
        ({"max_tokens": 8, "messages": HI, "thinking": {"type": "enabled"}}, "thinking"),
        ({"max_tokens": 8, "messages": []}, "messages"),
        ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        (
            {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
            "messages[0].content[0]",
        ),
        (
            {
                "max_tokens": 8,
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}
                ],
            },
            "messages[0].content[0].source",
        ),
        (
            {
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ],
            },
            "messages[0].content[0]",
        ),
        (
            {"max_tokens": 8, "messages": [*HI, {"role": "assistant", "content": "Sure,"}]},
            "messages[1]",
        ),
        (
            {"max_tokens": 8, "messages": HI, "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice",
        ),
        (
            {
                "max_tokens": 8,
                "messages": HI,
                "tools": [{**WEATHER_TOOL, "input_schema": {"type": "objekt"}}],
            },
            "tools[0].input_schema",
        ),
    ],
)
async def test_bad_requests_are_400_naming_the_clients_field(make_client, body, where):
    client = await make_client(FakeBackend())
    response = await client.post(MESSAGES, json=body)
    assert response.status == 400
    message = assert_anthropic_error(await response.json(), "invalid_request_error")
    assert f"'{where}" in message, message


async def test_a_bad_image_in_a_tool_result_names_its_block(make_client):
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "text", "text": "x"}, image_block(b"not an image", "image/png")],
    }
    body = {"max_tokens": 8, "messages": [{"role": "user", "content": [result]}]}
    client = await make_client(FakeBackend())
    response = await client.post(MESSAGES, json=body)
    assert response.status == 400
    message = assert_anthropic_error(await response.json(), "invalid_request_error")
    assert "messages[0].content[0].content[1].source" in message, message


async def test_sdk_exceptions_by_status(sdk):
    client = await sdk(FakeBackend())
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(
            model=SERVED_MODEL, max_tokens=8, messages=HI, extra_body={"top_p": 2.0}
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="claude-x", max_tokens=8, messages=HI)
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "claude-x" in missing.value.body["error"]["message"]

    client = await sdk(FakeBackend(error_at=0, error=busy()))
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        await client.messages.create(model=SERVED_MODEL, max_tokens=8, messages=HI)
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    assert overloaded.value.response.headers["Retry-After"] == "1"

    client = await sdk(FakeBackend(error_at=0, error=RuntimeError("CUDA at /opt/x.py")))
    with pytest.raises(anthropic.InternalServerError) as internal:
        await client.messages.create(model=SERVED_MODEL, max_tokens=8, messages=HI)
    assert internal.value.body["error"]["type"] == "api_error"
    assert_no_leak(json.dumps(internal.value.body))


async def test_a_failure_mid_stream_is_an_error_event(make_client, sdk):
    client = await make_client(FakeBackend(error_at=2, error=busy()))
    response = await client.post(MESSAGES, json={"max_tokens": 8, "stream": True, "messages": HI})
    events = sse_events(await response.text())
    assert [kind for kind, _ in events][-3:] == [
        "content_block_delta",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1]["error"]["type"] == "overloaded_error"

    sdk_client = await sdk(FakeBackend(error_at=2, error=busy()))
    with pytest.raises(anthropic.APIStatusError) as failed:
        async with sdk_client.messages.stream(model=SERVED_MODEL, max_tokens=8, messages=HI) as s:
            await s.get_final_message()
    assert failed.value.body["error"]["type"] == "overloaded_error"


async def test_the_error_is_counted_by_its_code_not_the_envelope(make_client):
    client = await make_client(FakeBackend(error_at=0, error=busy()))
    assert (await client.post(MESSAGES, json={"max_tokens": 8, "messages": HI})).status == 503
    metrics = await (await client.get("/metrics")).text()
    line = 'qwen_vl_proxy_rejected_requests_total{cause="overloaded"} 1.0'
    assert line in metrics.splitlines(), metrics


# ---- the API key: Bearer or x-api-key ------------------------------------------------------


async def test_the_key_as_bearer_or_x_api_key(make_client, sdk):
    client = await sdk(FakeBackend(), api_key=KEY)
    assert (await client.messages.create(model=SERVED_MODEL, max_tokens=8, messages=HI)).content

    raw = await make_client(FakeBackend(), api_key=KEY)
    body = {"max_tokens": 8, "messages": HI}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    assert (await raw.post(MESSAGES, json=body, headers=headers)).status == 200
    # x-api-key, when sent, is the key presented: a right Bearer token does not rescue it
    wrong = {"x-api-key": "sk-wrong", "Authorization": f"Bearer {KEY}"}
    response = await raw.post(MESSAGES, json=body, headers=wrong)
    assert response.status == 401
    assert_anthropic_error(await response.json(), "authentication_error")
    # only this route takes x-api-key; chat completions still answer OpenAI's 401
    chat = {"messages": HI}
    response = await raw.post("/v1/chat/completions", json=chat, headers={"x-api-key": KEY})
    assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"

    sdk_client = await sdk(FakeBackend(), api_key="sk-other")
    sdk_client.api_key = "sk-wrong"
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await sdk_client.messages.create(model=SERVED_MODEL, max_tokens=8, messages=HI)
    assert refused.value.body["error"]["type"] == "authentication_error"
