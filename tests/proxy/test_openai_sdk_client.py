"""The official `openai` SDK, sync and async, stream and non-stream, against the app served
on 127.0.0.1 with a scripted backend: every part of the chat surface must work unchanged."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from helpers import data_url
from proxy_fakes import (
    JPEG_BYTES,
    PNG_BYTES,
    SERVED_MODEL,
    TRITON_MODEL,
    FakeBackend,
    script,
    serving_app,
)
from sample_images import encoded_image

from proxy.transport.backend import client_error
from proxy.transport.contract import ModelError


class SDK:
    """One app, reached through AsyncOpenAI or OpenAI (the sync client runs in a thread, so
    the app keeps serving on this event loop)."""

    def __init__(self, base_url: str, mode: str) -> None:
        self.mode = mode
        self._http_async = httpx.AsyncClient(trust_env=False)  # no proxy env vars on loopback
        self._http_sync = httpx.Client(trust_env=False)
        options = {"base_url": base_url, "api_key": "unused", "max_retries": 0}
        self.async_client = openai.AsyncOpenAI(http_client=self._http_async, **options)
        self.sync_client = openai.OpenAI(http_client=self._http_sync, **options)

    async def create(self, **kwargs: Any) -> Any:
        """A completion, or the list of chunks when streaming."""
        if self.mode == "async":
            result = await self.async_client.chat.completions.create(**kwargs)
            return [chunk async for chunk in result] if kwargs.get("stream") else result

        def run() -> Any:
            result = self.sync_client.chat.completions.create(**kwargs)
            return list(result) if kwargs.get("stream") else result

        return await asyncio.to_thread(run)

    async def raw(self, **kwargs: Any) -> Any:
        """(headers, parsed completion) of a non-stream request."""
        if self.mode == "async":
            response = await self.async_client.chat.completions.with_raw_response.create(**kwargs)
            return response.headers, response.parse()
        response = await asyncio.to_thread(
            self.sync_client.chat.completions.with_raw_response.create, **kwargs
        )
        return response.headers, response.parse()

    async def models(self, method: str, *args: Any) -> Any:
        if self.mode == "async":
            return await getattr(self.async_client.models, method)(*args)
        return await asyncio.to_thread(getattr(self.sync_client.models, method), *args)

    async def close(self) -> None:
        await self._http_async.aclose()
        self._http_sync.close()


@pytest.fixture(params=["async", "sync"])
async def sdk(request, make_client):
    """`await sdk(backend, **config)`: an SDK wrapper for a fresh app, in both client modes."""
    wrappers: list[SDK] = []

    async def make(backend: FakeBackend, **config: Any) -> SDK:
        server = await make_client(backend, **config)
        wrapper = SDK(str(server.make_url("/v1")), request.param)
        wrappers.append(wrapper)
        return wrapper

    yield make
    for wrapper in wrappers:
        await wrapper.close()


@pytest.fixture(params=[False, True], ids=["non-stream", "stream"])
def stream(request) -> bool:
    return request.param


@pytest.fixture
async def image_server():
    """Base URL of a server on 127.0.0.1 with /png and /jpeg."""

    async def png(request):
        return web.Response(body=PNG_BYTES, content_type="image/png")

    async def jpeg(request):
        return web.Response(body=JPEG_BYTES, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/png", png)
    app.router.add_get("/jpeg", jpeg)
    async with serving_app(app) as server:
        yield f"http://127.0.0.1:{server.server.port}"


LOCAL_FETCH = {"image_fetch_allow_private_hosts": ("127.0.0.1",)}


def text_of(result: Any, stream: bool) -> str:
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in result if c.choices)
    return result.choices[0].message.content


def image_parts(*urls: str, **image_url: Any) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url, **image_url}} for url in urls]


MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            *image_parts(data_url(JPEG_BYTES, "image/jpeg")),
        ],
    }
]


# ---- basics --------------------------------------------------------------------------------


async def test_completion_shape(sdk, stream):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20))
    client = await sdk(backend)

    result = await client.create(
        model=SERVED_MODEL, messages=MESSAGES, max_tokens=16, temperature=0.2, stream=stream
    )

    assert text_of(result, stream) == "A cat."
    if stream:
        assert result[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in result if c.choices][-1] == "stop"
        assert len({c.id for c in result}) == 1 and result[0].id.startswith("chatcmpl-")
        assert {c.model for c in result} == {SERVED_MODEL}
    else:
        assert result.id.startswith("chatcmpl-")
        assert result.model == SERVED_MODEL
        assert result.choices[0].message.role == "assistant"
        assert result.choices[0].finish_reason == "stop"
        assert result.usage.total_tokens == 23
    assert backend.last_request.media["image"] == [JPEG_BYTES]
    assert backend.last_request.sampling_parameters == {"max_tokens": 16, "temperature": 0.2}


async def test_stream_include_usage_ends_with_a_usage_chunk(sdk):
    client = await sdk(FakeBackend(script("A", " cat", ".", prompt_tokens=20, image_tokens=4)))
    chunks = await client.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert text_of(chunks, True) == "A cat."
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (20, 3)
    assert all(c.usage is None for c in chunks[:-1])


async def test_mid_stream_error_raises(sdk):
    client = await sdk(FakeBackend(script("a", "b", "c"), error_at=2, error=RuntimeError("x")))
    with pytest.raises(openai.APIError):
        await client.create(model=SERVED_MODEL, messages=MESSAGES, stream=True)


# ---- 1. content parts ----------------------------------------------------------------------


async def test_many_images_across_turns_and_image_only_messages(sdk, stream):
    backend = FakeBackend()
    client = await sdk(backend)
    gif = encoded_image("GIF", size=(5, 5))
    webp = encoded_image("WEBP", size=(6, 6))
    assistant_turn = [{"type": "text", "text": "Two images."}, *image_parts(data_url(webp))]
    user_turn = [{"type": "text", "text": "And this?"}, *image_parts(data_url(JPEG_BYTES))]
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": image_parts(data_url(PNG_BYTES), data_url(gif))},
        {"role": "assistant", "content": assistant_turn},
        {"role": "user", "content": user_turn},
        {"role": "user", "content": "plain string content"},
    ]
    await client.create(model=SERVED_MODEL, messages=messages, stream=stream)
    assert backend.last_request.media["image"] == [PNG_BYTES, gif, webp, JPEG_BYTES]
    sent = json.loads(backend.last_request.messages_json)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "user"]
    assert [p["type"] for p in sent[1]["content"]] == ["image", "image"]
    assert sent[4]["content"] == "plain string content"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ],
)
async def test_unsupported_parts_are_bad_request(sdk, part):
    backend = FakeBackend()
    client = await sdk(backend)
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(model=SERVED_MODEL, messages=messages)
    assert caught.value.code == "unsupported_content_type"
    assert caught.value.param == "messages[0].content[1]"
    assert backend.requests == []


# ---- 2. remote images ----------------------------------------------------------------------


async def test_http_images_are_fetched_in_order(sdk, stream, image_server):
    backend = FakeBackend()
    client = await sdk(backend, **LOCAL_FETCH)
    content = image_parts(f"{image_server}/jpeg", data_url(PNG_BYTES), f"{image_server}/png")
    await client.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": content}], stream=stream
    )
    assert backend.last_request.media["image"] == [JPEG_BYTES, PNG_BYTES, PNG_BYTES]


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://169.254.169.254/latest/meta-data/", "image_url_forbidden"),
        ("http://[::1]/a.png", "image_url_forbidden"),
        ("file:///etc/passwd", "image_url_forbidden"),
        ("data:text/html,<b>x</b>", "invalid_image"),
    ],
)
async def test_hostile_image_urls_are_bad_request(sdk, url, code):
    backend = FakeBackend()
    client = await sdk(backend)
    messages = [{"role": "user", "content": image_parts(url)}]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(model=SERVED_MODEL, messages=messages, stream=True)
    assert caught.value.code == code
    assert caught.value.param == "messages[0].content[0].image_url"
    assert backend.requests == []


async def test_image_fetch_failure_is_bad_request(sdk, image_server):
    client = await sdk(FakeBackend(), **LOCAL_FETCH)
    messages = [{"role": "user", "content": image_parts(f"{image_server}/missing")}]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(model=SERVED_MODEL, messages=messages)
    assert caught.value.code == "image_fetch_failed"


# ---- 3. pixel budgets ----------------------------------------------------------------------


async def test_detail_and_pixel_bounds_travel_per_image(sdk, stream):
    backend = FakeBackend()
    client = await sdk(backend)
    content = [
        *image_parts(data_url(PNG_BYTES), detail="low"),
        *image_parts(data_url(PNG_BYTES), detail="high"),
        *image_parts(data_url(PNG_BYTES), max_pixels=50176),
    ]
    await client.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": content}],
        stream=stream,
        extra_body={"min_pixels": 6272},
    )
    sent = json.loads(backend.last_request.messages_json)[0]["content"]
    assert [(p["min_pixels"], p["max_pixels"]) for p in sent] == [
        (6272, 200704),
        (6272, 1003520),
        (6272, 50176),
    ]


async def test_pixel_bounds_outside_the_server_range_are_bad_request(sdk):
    client = await sdk(FakeBackend())
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(
            model=SERVED_MODEL, messages=MESSAGES, extra_body={"max_pixels": 12845056}
        )
    assert (caught.value.code, caught.value.param) == ("invalid_value", "max_pixels")


# ---- 4. sampling and request fields --------------------------------------------------------


async def test_every_sampling_field_reaches_the_model(sdk, stream):
    backend = FakeBackend()
    client = await sdk(backend, max_tokens_limit=64)
    await client.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        stream=stream,
        max_tokens=10,
        max_completion_tokens=500,  # wins over max_tokens, then clamped to 64
        temperature=0,
        top_p=0.8,
        presence_penalty=1.5,
        frequency_penalty=-1.5,
        seed=1234,
        stop=["\n\n", "END"],
        n=1,
        user="user-42",
        logprobs=True,
        top_logprobs=3,
        response_format={"type": "text"},
        extra_body={"top_k": 5, "repetition_penalty": 1.2},
    )
    assert backend.last_request.sampling_parameters == {
        "max_tokens": 64,
        "temperature": 0,
        "top_p": 0.8,
        "top_k": 5,
        "repetition_penalty": 1.2,
        "presence_penalty": 1.5,
        "frequency_penalty": -1.5,
        "seed": 1234,
        "stop": ["\n\n", "END"],
        "logprobs": True,
        "top_logprobs": 3,
    }
    assert backend.last_request.stream is stream


async def test_stop_as_a_string(sdk):
    backend = FakeBackend()
    client = await sdk(backend)
    await client.create(model=SERVED_MODEL, messages=MESSAGES, stop="END")
    assert backend.last_request.sampling_parameters == {"stop": ["END"]}


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"n": 0}, "n", "invalid_value"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop", "invalid_value"),
    ],
)
async def test_unsupported_or_invalid_fields_are_bad_request(sdk, fields, param, code):
    backend = FakeBackend()
    client = await sdk(backend)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(model=SERVED_MODEL, messages=MESSAGES, **fields)
    assert (caught.value.param, caught.value.code) == (param, code)
    assert backend.requests == []


async def test_unknown_fields_come_back_in_x_ignored_fields(sdk):
    client = await sdk(FakeBackend())
    headers, completion = await client.raw(
        model=SERVED_MODEL,
        messages=MESSAGES,
        service_tier="auto",
        extra_body={"my_custom_field": 1},
    )
    assert completion.choices[0].message.content == "Hello world!"
    assert headers["x-ignored-fields"] == "service_tier, my_custom_field"


# ---- 5. the model contract: image tokens, logprobs, errors ---------------------------------


async def test_image_tokens_in_usage_details(sdk, stream):
    client = await sdk(FakeBackend(script("a", "b", prompt_tokens=270, image_tokens=256)))
    result = await client.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        stream=stream,
        stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
    )
    usage = result[-1].usage if stream else result.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (270, 2, 272)
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.model_extra["image_tokens"] == 256


async def test_logprobs(sdk, stream):
    client = await sdk(FakeBackend(script("Hi", " there", logprobs=True)))
    result = await client.create(
        model=SERVED_MODEL, messages=MESSAGES, stream=stream, logprobs=True, top_logprobs=2
    )
    if stream:
        entries = [
            e
            for c in result
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
    else:
        entries = result.choices[0].logprobs.content
    assert [e.token for e in entries] == ["Hi", " there"]
    assert [e.logprob for e in entries] == [0.0, -0.5]
    assert entries[1].bytes == list(b" there")
    assert [t.token for t in entries[0].top_logprobs] == ["Hi", "?"]


async def test_no_logprobs_unless_asked(sdk, stream):
    client = await sdk(FakeBackend(script("Hi", logprobs=True)))
    result = await client.create(model=SERVED_MODEL, messages=MESSAGES, stream=stream)
    choices = [c.choices[0] for c in result if c.choices] if stream else result.choices
    assert all(choice.logprobs is None for choice in choices)


async def test_model_json_errors_reach_the_client(sdk, stream):
    error = client_error(
        ModelError(
            "invalid_request",
            "This model's maximum context length is 8192 tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    )
    client = await sdk(FakeBackend(error_at=0, error=error))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.create(model=SERVED_MODEL, messages=MESSAGES, stream=stream)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "max_tokens"
    assert "8192" in caught.value.message


# ---- 6. models -----------------------------------------------------------------------------

MAPPED = {"model_map": (("qwen-alias", TRITON_MODEL), ("qwen-small", "qwen_small"))}


async def test_models_list_retrieve_and_select(sdk, stream):
    backend = FakeBackend(models={TRITON_MODEL: "READY", "qwen_small": ""})
    client = await sdk(backend, **MAPPED)

    models = await client.models("list")
    assert [m.id for m in models.data] == [SERVED_MODEL, "qwen-alias", "qwen-small"]
    assert (await client.models("retrieve", "qwen-alias")).id == "qwen-alias"
    with pytest.raises(openai.NotFoundError):
        await client.models("retrieve", "gpt-4o")

    result = await client.create(model="qwen-small", messages=MESSAGES, stream=stream)
    assert (result[0] if stream else result).model == "qwen-small"
    assert backend.last_request.model == "qwen_small"


async def test_unknown_model_is_not_found(sdk):
    client = await sdk(FakeBackend())
    with pytest.raises(openai.NotFoundError) as caught:
        await client.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


# ---- 7. lazy loading -----------------------------------------------------------------------


async def test_lazy_load_first_requests_share_one_load(sdk, stream):
    backend = FakeBackend(ready=False)
    backend.load_delay_s = 0.2
    client = await sdk(backend, lazy_load=True)
    results = await asyncio.gather(
        *(client.create(model=SERVED_MODEL, messages=MESSAGES, stream=stream) for _ in range(3))
    )
    assert [text_of(r, stream) for r in results] == ["Hello world!"] * 3
    assert backend.load_calls == [TRITON_MODEL]


async def test_lazy_load_timeout_is_service_unavailable(sdk):
    backend = FakeBackend(ready=False)
    backend.load_delay_s = 1.0
    client = await sdk(backend, lazy_load=True, load_timeout_s=0.05)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.create(model=SERVED_MODEL, messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.code == "model_loading"


# ---- tools and structured outputs ----------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL_TEXT = (
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


def tokens_of(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def test_tool_calls_come_back_in_openais_shape(sdk, stream):
    backend = FakeBackend(script(*tokens_of(CALL_TEXT)))
    client = await sdk(backend)
    result = await client.create(
        model=SERVED_MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], stream=stream
    )
    if stream:
        content, calls, finish = "", {}, None
        for chunk in result:
            delta = chunk.choices[0].delta if chunk.choices else None
            content += (delta.content or "") if delta else ""
            for call in (delta.tool_calls or []) if delta else []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        assert content == "Checking.\n"
        (call,) = calls.values()
        name, arguments, call_id = call["name"], call["arguments"], call["id"]
    else:
        message = result.choices[0].message
        assert message.content == "Checking."
        (tool_call,) = message.tool_calls
        name, arguments, call_id = (
            tool_call.function.name,
            tool_call.function.arguments,
            tool_call.id,
        )
        finish = result.choices[0].finish_reason
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert call_id.startswith("call_")
    sent = backend.last_request
    assert json.loads(sent.tools_json) == [WEATHER_TOOL]
    assert "structured" not in sent.sampling_parameters  # auto: the model may answer in text


async def test_forced_tool_choice_and_json_schema_reach_the_model_as_constraints(sdk):
    backend = FakeBackend(script('{"a": 1}'))
    client = await sdk(backend)
    await client.create(
        model=SERVED_MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert backend.last_request.sampling_parameters["structured"]["type"] == "tool_calls"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await client.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema}},
    )
    assert backend.last_request.sampling_parameters["structured"] == {
        "type": "json_schema",
        "schema": schema,
        "strict": False,
    }


async def test_the_sdks_parse_helper_gets_a_parsed_object(sdk):
    import pydantic

    class Answer(pydantic.BaseModel):
        city: str
        days: int

    backend = FakeBackend(script('{"city": "Paris", ', '"days": 3}'))
    client = await sdk(backend)
    if client.mode == "async":
        completion = await client.async_client.chat.completions.parse(
            model=SERVED_MODEL, messages=MESSAGES, response_format=Answer
        )
    else:
        completion = await asyncio.to_thread(
            client.sync_client.chat.completions.parse,
            model=SERVED_MODEL,
            messages=MESSAGES,
            response_format=Answer,
        )
    assert completion.choices[0].message.parsed == Answer(city="Paris", days=3)
    assert backend.last_request.sampling_parameters["structured"]["type"] == "json_schema"


async def test_a_tool_round_trip_reaches_the_model_with_calls_and_results(sdk):
    backend = FakeBackend(script("It is sunny."))
    client = await sdk(backend)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES)}},
                {"type": "text", "text": "Weather where this is?"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    result = await client.create(model=SERVED_MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert result.choices[0].message.content == "It is sunny."
    sent = json.loads(backend.last_request.messages_json)
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
