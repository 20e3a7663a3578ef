"""TritonBackend against a real tritonserver running the echo model (tests/proxy/triton_models).

The echo model speaks the Qwen2.5-VL model's tensor contract, so these tests pin what the
proxy sends and how it reads responses, errors, final flags and cancellation, in seconds and
without weights. Skipped where the nvidia-pytriton wheel (the tritonserver binary) is absent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json

import pytest
from echo_triton import echo_tritonserver
from held_servers import server_fixture
from helpers import data_url, sse_payloads, wait_until_async
from proxy_fakes import JPEG_BYTES, PNG_BYTES, TEST_CONFIG, serving
from stack import free_port

from proxy.config import with_settings
from proxy.errors import APIError
from proxy.transport.backend import TritonBackend, TritonRequest
from proxy.transport.contract import ModelError, ModelLimits, Priority


@pytest.fixture
def triton_url(echo_triton_url) -> str:
    return echo_triton_url


def _explicit_triton(tmp_path_factory):
    """A tritonserver in explicit model control: the echo model is in the repository, unloaded."""
    root = tmp_path_factory.mktemp("triton-explicit")
    return echo_tritonserver(root, "--model-control-mode=explicit", ready_model=None)


explicit_triton_url = server_fixture(
    "explicit_triton_url", _explicit_triton, scope="module", ahead=True
)


@pytest.fixture
async def backend(triton_url):
    backend = TritonBackend(triton_url)
    yield backend
    await backend.close()


def triton_request(*, stream: bool, images=(), **params) -> TritonRequest:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "hello big world"}],
        }
    ]
    return TritonRequest(
        model="echo",
        messages_json=json.dumps(messages),
        media={"image": list(images)},
        sampling_parameters={"max_tokens": 8, **params},
        stream=stream,
    )


def digest(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()[:8]


async def test_is_ready(backend):
    assert await backend.is_ready("echo")
    assert not await backend.is_ready("no_such_model")


async def test_repository_index_lists_the_model(backend):
    assert (await backend.repository_index())["echo"] == "READY"


async def test_the_model_describes_its_limits(backend):
    # the echo model's config.pbtxt parameters; what it does not name keeps the defaults
    assert await backend.describe("echo") == ModelLimits(max_images=3, max_tokens=64)


async def test_describing_a_model_triton_does_not_have_is_unavailable(backend):
    with pytest.raises(APIError) as raised:
        await backend.describe("no_such_model")
    assert raised.value.status == 503


async def test_image_tokens_and_logprobs_cross_the_wire(backend):
    request = triton_request(stream=True, images=[PNG_BYTES], logprobs=True, top_logprobs=2)
    chunks = [chunk async for chunk in backend.generate(request, "live-lp")]
    assert {c.image_tokens for c in chunks} == {10}  # the echo model: 10 per image
    words = [c.text.strip() for c in chunks]
    assert [[e["token"] for e in c.logprobs] for c in chunks] == [[w] for w in words]
    first = chunks[0].logprobs[0]
    assert first["logprob"] == -1.0 and first["bytes"] == list(words[0].encode())
    assert [t["token"] for t in first["top_logprobs"]] == [words[0], "~"]


async def test_model_json_error_fills_the_envelope(backend):
    detail = ModelError("invalid_request", "too long", "max_tokens", "context_length_exceeded")
    request = triton_request(stream=False, echo_error=detail.encode())
    with pytest.raises(APIError) as caught:
        [chunk async for chunk in backend.generate(request, "live-json")]
    assert (caught.value.status, caught.value.message) == (400, "too long")
    assert (caught.value.param, caught.value.code) == ("max_tokens", "context_length_exceeded")


async def test_non_stream_is_one_chunk_with_everything(backend):
    request = triton_request(stream=False, images=[PNG_BYTES, JPEG_BYTES])
    chunks = [chunk async for chunk in backend.generate(request, "live-1")]

    assert len(chunks) == 1
    (chunk,) = chunks
    assert chunk.text == (
        f"messages=1 images={digest(PNG_BYTES)},{digest(JPEG_BYTES)} params=max_tokens "
        "<image>|hello big world"
    )
    assert chunk.finish_reason == "stop"
    assert chunk.prompt_tokens and chunk.prompt_tokens > 0
    assert chunk.completion_tokens == len(chunk.text.split())  # the echo model counts words


async def test_a_batch_class_request_crosses_tritonserver(backend):
    """The `priority` input as the proxy builds it is one Triton takes (BYTES [1])."""
    request = dataclasses.replace(triton_request(stream=False), priority=Priority.BATCH)
    chunks = [chunk async for chunk in backend.generate(request, "live-priority")]
    assert len(chunks) == 1 and chunks[0].finish_reason == "stop"


@pytest.mark.parametrize("flag_last", [False, True], ids=["empty-final", "flagged-last"])
async def test_stream_yields_deltas_until_final(backend, flag_last):
    params = {"echo_flag_last": True} if flag_last else {}
    request = triton_request(stream=True, **params)
    chunks = [chunk async for chunk in backend.generate(request, "live-2")]

    assert [c.text for c in chunks][-3:] == [" <image>|hello", " big", " world"]
    assert "".join(c.text for c in chunks).startswith("messages=1 images=- params=")
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert sum(c.completion_tokens for c in chunks) == len(chunks)


async def test_invalid_request_error_is_400_with_model_message(backend):
    request = triton_request(
        stream=True, echo_error=ModelError("invalid_request", "at most 4 images").encode()
    )
    with pytest.raises(APIError) as caught:
        [chunk async for chunk in backend.generate(request, "live-3")]
    assert caught.value.status == 400
    assert caught.value.message == "at most 4 images"
    assert caught.value.type == "invalid_request_error"


async def test_other_model_error_is_generic_500(backend):
    request = triton_request(stream=False, echo_error="CUDA OOM in /opt/models/qwen/model.py")
    with pytest.raises(APIError) as caught:
        [chunk async for chunk in backend.generate(request, "live-4")]
    assert caught.value.status == 500
    assert "/opt" not in caught.value.message and "OOM" not in caught.value.message
    assert "live-4" in caught.value.message


async def test_closing_the_generator_cancels_the_model_request(backend, tmp_path):
    marker = tmp_path / "cancelled"
    request = triton_request(stream=True, echo_delay_s=0.2, echo_cancel_marker=str(marker))
    chunks = backend.generate(request, "live-5")

    await anext(chunks)
    await chunks.aclose()

    await wait_until_async(marker.exists, timeout=5, what="the model to see the cancellation")
    assert marker.read_text() == "cancelled"


async def test_unreachable_triton_is_503_and_not_ready():
    backend = TritonBackend(f"127.0.0.1:{free_port()}", ready_timeout_s=1.0)
    try:
        assert not await backend.is_ready("echo")
        with pytest.raises(APIError) as caught:
            [chunk async for chunk in backend.generate(triton_request(stream=True), "live-6")]
        assert caught.value.status == 503
        assert caught.value.code == "backend_unavailable"
        assert "127.0.0.1" not in caught.value.message
    finally:
        await backend.close()


async def test_app_over_real_triton_streams_and_completes(triton_url):
    config = with_settings(TEST_CONFIG, triton_url=triton_url, triton_model="echo")
    async with serving(config) as client:
        assert (await client.get("/ready")).status == 200
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES)}},
                    {"type": "text", "text": "describe this"},
                ],
            }
        ]
        resp = await client.post(
            "/v1/chat/completions", json={"messages": messages, "stream": True}
        )
        events = sse_payloads(await resp.text())
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])

        resp = await client.post("/v1/chat/completions", json={"messages": messages})
        completion = await resp.json()

    expected = f"messages=1 images={digest(PNG_BYTES)} params=- <image>|describe this"
    assert streamed == expected
    assert completion["choices"][0]["message"]["content"] == expected
    assert completion["usage"]["completion_tokens"] == len(expected.split())


async def test_the_proxy_holds_requests_to_the_limits_the_model_describes(triton_url):
    """The echo model allows 3 images (its config.pbtxt); the proxy's own default is 16."""
    config = with_settings(TEST_CONFIG, triton_url=triton_url, triton_model="echo")
    async with serving(config) as client:
        image = {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES)}}
        resp = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": [image] * 4}]}
        )
        error = (await resp.json())["error"]
    assert resp.status == 400
    assert (error["code"], error["param"]) == (
        "too_many_images",
        "messages[0].content[3].image_url",
    )
    assert "at most 3" in error["message"]


async def test_lazy_load_over_real_triton_in_explicit_mode(explicit_triton_url):
    """--lazy-load against Triton's explicit model control: listed before loading, /ready 503
    until the first request, one load shared by concurrent first requests, then 200."""
    config = with_settings(
        TEST_CONFIG, triton_url=explicit_triton_url, triton_model="echo", lazy_load=True
    )
    async with serving(config) as client:
        models = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [config.server.served_model_name]
        resp = await client.get("/ready")
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "model_not_loaded"

        body = {"messages": [{"role": "user", "content": "hello lazy"}]}
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(3))
        )
        assert [r.status for r in responses] == [200, 200, 200]
        assert (await client.get("/ready")).status == 200


async def test_lora_adapters_over_real_triton(triton_url):
    """The echo model's adapters through the proxy: listed with their parent, a request's
    `model` picks one (the model echoes its `lora` input), loaded and unloaded at run time
    with the admin key; the model's path refusal and unknown names come back as envelopes."""
    config = with_settings(
        TEST_CONFIG, triton_url=triton_url, triton_model="echo", admin_api_key="adm"
    )
    admin = {"Authorization": "Bearer adm"}
    hello = [{"role": "user", "content": "hello"}]
    async with serving(config) as client:
        models = (await (await client.get("/v1/models")).json())["data"]
        assert {m["id"]: m["parent"] for m in models}[
            "echo-lora"
        ] == TEST_CONFIG.server.served_model_name
        answer = await client.post(
            "/v1/chat/completions", json={"model": "echo-lora", "messages": hello}
        )
        assert (await answer.json())["choices"][0]["message"]["content"].startswith(
            "lora=echo-lora "
        )

        outside = {"lora_name": "live-lora", "lora_path": "adapters/live"}
        refused = await client.post("/v1/load_lora_adapter", json=outside, headers=admin)
        assert refused.status == 400 and (await refused.json())["error"]["param"] == "lora_path"
        load = {"lora_name": "live-lora", "lora_path": "loras/live"}
        assert (await client.post("/v1/load_lora_adapter", json=load, headers=admin)).status == 200
        body = {"model": "live-lora", "messages": hello}
        answer = await client.post("/v1/chat/completions", json=body)
        assert (await answer.json())["model"] == "live-lora"
        unload = {"lora_name": "live-lora"}
        assert (
            await client.post("/v1/unload_lora_adapter", json=unload, headers=admin)
        ).status == 200
        gone = await client.post("/v1/chat/completions", json=body)
        assert gone.status == 404 and (await gone.json())["error"]["code"] == "model_not_found"


async def test_the_models_media_cache_hits_reach_the_chunk(backend):
    request = dataclasses.replace(
        triton_request(stream=True, images=[JPEG_BYTES]), lora="echo-lora"
    )
    hits = []
    for _ in range(2):
        chunks = [chunk async for chunk in backend.generate(request, "hits")]
        hits.append(chunks[-1].media_cache_hits)
    assert hits == [0, 1]  # its (adapter, image) pair was new, then cached
