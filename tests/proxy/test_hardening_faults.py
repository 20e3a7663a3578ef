"""The proxy's real gRPC client against a fake Triton (tests/proxy/fake_triton.py) that can
fail, die mid-stream and come back on the same port; and `python -m proxy` as a process,
drained by SIGTERM with streams in flight."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from hardening_helpers import CHAT, assert_envelope, assert_no_leak
from helpers import sse_payloads, wait_until_async
from proxy_fakes import SERVED_MODEL, TEST_CONFIG, serving
from proxy_process import ProxyProcess

from proxy.config import with_settings


def chat(script: str, *, stream: bool = True) -> dict:
    return {
        "model": SERVED_MODEL,
        "stream": stream,
        "messages": [{"role": "user", "content": script}],
    }


@pytest.fixture
async def proxy_client(fake_triton):
    """The in-process app with its real TritonBackend, pointed at the fake Triton."""
    async with serving(with_settings(TEST_CONFIG, triton_url=fake_triton.url)) as client:
        yield client


# ---- model errors over real gRPC -----------------------------------------------------------


@pytest.mark.parametrize(
    "message, status, code",
    [
        ("model_error=busy", 503, "server_busy"),
        ("model_error=unavailable", 503, "model_unavailable"),
        ("model_error=internal", 500, "internal_error"),
        ("Server_is_stopping,_scheduler_for_model_has_stopped", 503, "model_unavailable"),
        (
            "Failed_to_process:_RuntimeError:_CUDA_OOM_at_/opt/x/model.py(12)_0x7f3a2b1c0d00"
            "_shm:_triton_python_backend_shm_region_1_from_10.0.0.7:8001",
            500,
            "internal_error",
        ),
    ],
)
async def test_a_failing_request_fails_alone_without_leaking(proxy_client, message, status, code):
    for stream in (False, True):
        directive = message if message.startswith("model_error=") else f"error={message}"
        response = await proxy_client.post(CHAT, json=chat(directive, stream=stream))
        text = await response.text()
        assert response.status == status, text
        assert_no_leak(text)
        assert assert_envelope(json.loads(text), code)
        if status == 503:
            assert response.headers["Retry-After"] == "1"
        else:
            assert response.headers["X-Request-Id"] in text
    ok = await proxy_client.post(CHAT, json=chat("tokens=2", stream=False))
    assert (await ok.json())["choices"][0]["message"]["content"] == "t0 t1 "


# ---- Triton dies mid-stream and comes back -------------------------------------------------


async def test_triton_killed_mid_stream_then_back_on_the_same_port(proxy_client, fake_triton):
    assert (await proxy_client.get("/ready")).status == 200
    response = await proxy_client.post(CHAT, json=chat("tokens=100 delay=0.05"))
    assert response.status == 200
    await response.content.readuntil(b"\n\n")  # the role chunk
    await response.content.readuntil(b"\n\n")  # a first token
    await fake_triton.stop()
    events = sse_payloads((await response.read()).decode(), strict=False)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "backend_unavailable"
    assert_no_leak(json.dumps(events[-2]))

    assert (await proxy_client.get("/ready")).status == 503
    refused = await proxy_client.post(CHAT, json=chat("tokens=2"))
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert_envelope(await refused.json(), "backend_unavailable")

    await fake_triton.start()  # same port; the proxy's channel reconnects by itself

    async def ready() -> bool:
        return (await proxy_client.get("/ready")).status == 200

    await wait_until_async(ready, timeout=10)
    again = await proxy_client.post(CHAT, json=chat("tokens=3", stream=False))
    assert (await again.json())["choices"][0]["message"]["content"] == "t0 t1 t2 "


async def test_client_disconnect_cancels_the_triton_stream(proxy_client, fake_triton):
    response = await proxy_client.post(CHAT, json=chat("tokens=200 delay=0.05"))
    await response.content.readuntil(b"\n\n")
    response.close()

    async def cancelled() -> bool:
        return fake_triton.state.cancelled == 1

    await wait_until_async(cancelled, timeout=5)
    assert fake_triton.state.completed == 0


# ---- SIGTERM on a real process -------------------------------------------------------------


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def start_stream(session, url: str, script: str):
    response = await session.post(url + CHAT, json=chat(script))
    assert response.status == 200
    await response.content.readuntil(b"\n\n")  # headers and the role chunk are out
    return response


async def test_sigterm_drains_in_flight_streams_then_exits(fake_triton, session, tmp_path):
    proxy = ProxyProcess(fake_triton.port, tmp_path / "proxy.log", "--shutdown-timeout-s", "20")
    await proxy.start()
    await proxy.wait_ready(session)
    try:
        streams = [await start_stream(session, proxy.url, "tokens=10 delay=0.2") for _ in range(3)]
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with session.get(proxy.url + "/ready") as response:
                return response.status == 503

        await wait_until_async(not_ready, timeout=2)
        async with session.post(proxy.url + CHAT, json=chat("tokens=1")) as refused:
            assert refused.status == 503
            assert_envelope(await refused.json(), "server_shutting_down")
        async with session.get(proxy.url + "/health") as health:
            assert health.status == 200  # alive while draining

        for response in streams:
            events = sse_payloads((await response.read()).decode(), strict=False)
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
            deltas = [e["choices"][0]["delta"] for e in events[:-1]]  # after the role chunk
            text = "".join(delta.get("content", "") for delta in deltas)
            assert text.split() == [f"t{i}" for i in range(10)]
        assert await asyncio.wait_for(proxy.process.wait(), 10) == 0
        assert time.monotonic() - signalled < 20  # well within the grace period
        assert fake_triton.state.completed == 3 and fake_triton.state.cancelled == 0
        assert "draining" in proxy.log()
    finally:
        await proxy.kill()


async def test_sigterm_past_the_grace_period_ends_streams_and_cancels_them(
    fake_triton, session, tmp_path
):
    proxy = ProxyProcess(fake_triton.port, tmp_path / "proxy.log", "--shutdown-timeout-s", "1")
    await proxy.start()
    await proxy.wait_ready(session)
    try:
        response = await start_stream(session, proxy.url, "tokens=100 delay=0.1")
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        events = sse_payloads((await response.read()).decode(), strict=False)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "server_shutting_down"
        assert await asyncio.wait_for(proxy.process.wait(), 10) == 0
        assert time.monotonic() - signalled < 5  # grace 1 s + aiohttp's 1 s + start-up slack

        async def cancelled() -> bool:
            return fake_triton.state.cancelled == 1

        await wait_until_async(cancelled, timeout=5)  # the generation stopped in "Triton" too
    finally:
        await proxy.kill()
