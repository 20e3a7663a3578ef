"""The official `openai` SDK against the app served on 127.0.0.1: clients must work unchanged."""

from __future__ import annotations

import httpx
import openai
import pytest
from proxy_fakes import JPEG_BYTES, SERVED_MODEL, FakeBackend, data_url, script


@pytest.fixture
async def sdk(make_client):
    """An AsyncOpenAI client for a fresh app; returns (client, backend) per call."""
    http_clients: list[httpx.AsyncClient] = []

    async def make(backend: FakeBackend) -> openai.AsyncOpenAI:
        server = await make_client(backend)
        http_client = httpx.AsyncClient(trust_env=False)  # no proxy env vars on loopback
        http_clients.append(http_client)
        return openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")),
            api_key="unused",
            max_retries=0,
            http_client=http_client,
        )

    yield make
    for http_client in http_clients:
        await http_client.aclose()


MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": data_url(JPEG_BYTES, "image/jpeg")}},
        ],
    }
]


async def test_sdk_non_stream(sdk):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20))
    client = await sdk(backend)

    completion = await client.chat.completions.create(
        model=SERVED_MODEL, messages=MESSAGES, max_tokens=16, temperature=0.2
    )

    assert completion.id.startswith("chatcmpl-")
    assert completion.model == SERVED_MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "A cat."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == 23
    assert backend.last_request.images == [JPEG_BYTES]
    assert backend.last_request.sampling_parameters == {"max_tokens": 16, "temperature": 0.2}


async def test_sdk_stream_with_usage(sdk):
    client = await sdk(FakeBackend(script("A", " cat", ".", prompt_tokens=20)))

    stream = await client.chat.completions.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "A cat."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


async def test_sdk_models_list(sdk):
    client = await sdk(FakeBackend())
    models = await client.models.list()
    assert [m.id for m in models.data] == [SERVED_MODEL]


async def test_sdk_sees_model_not_found(sdk):
    client = await sdk(FakeBackend())
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


async def test_sdk_stream_error_mid_stream_raises(sdk):
    client = await sdk(FakeBackend(script("a", "b", "c"), error_at=2, error=RuntimeError("x")))
    stream = await client.chat.completions.create(
        model=SERVED_MODEL, messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
