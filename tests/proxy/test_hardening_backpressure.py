"""Backpressure, deadlines, backend errors and draining, in process over a fake backend."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hardening_helpers import (
    CHAT,
    GENERATING_REQUESTS,
    NORMAL_REQUEST,
    assert_envelope,
    assert_no_leak,
    assert_route_envelope,
    json_bytes,
    post_head,
    raw_http,
)
from helpers import sse_payloads, wait_until_async
from proxy_fakes import TEST_CONFIG, FakeBackend, script, serving
from tritonclient.utils import InferenceServerException

from proxy.config import with_settings
from proxy.serving import admission as admission_module
from proxy.serving.admission import ADMISSION_KEY
from proxy.transport.backend import model_error
from proxy.transport.contract import ModelError

STREAM_REQUEST = {**NORMAL_REQUEST, "stream": True}
# Each generating route gets the cap, body, deadline and draining tests below (the table's
# generating routes are exactly these: tests/proxy/test_routes.py).
per_generating_route = pytest.mark.parametrize("path", list(GENERATING_REQUESTS))


def streamed(path: str) -> dict:
    return {**GENERATING_REQUESTS[path], "stream": True}


class HangingBackend(FakeBackend):
    """Sends `before` chunks, then never another."""

    def __init__(self, before: int = 0) -> None:
        super().__init__()
        self.before = before

    async def generate(self, request, request_id):
        self.requests.append((request, request_id))
        try:
            for chunk in self.chunks[: self.before]:
                yield chunk
            await asyncio.Event().wait()
        except (GeneratorExit, asyncio.CancelledError):
            self.stopped_early.set()
            raise


def admission(client):
    return client.server.app[ADMISSION_KEY]


async def read_stream(response) -> list[object]:
    return sse_payloads(await response.text(), strict=False)


# ---- load: 4x the cap ----------------------------------------------------------------------


async def test_four_times_the_cap_gets_200_or_429_and_every_stream_ends(make_client):
    cap = 4
    backend = FakeBackend(script(*[f"w{i} " for i in range(8)]), delay_s=0.02)
    client = await make_client(backend, max_concurrent_requests=cap)

    async def one(i: int):
        body = STREAM_REQUEST if i % 2 else NORMAL_REQUEST
        response = await client.post(CHAT, json=body)
        return (
            response.status,
            dict(response.headers),
            await response.text(),
            body is STREAM_REQUEST,
        )

    results = await asyncio.gather(*(one(i) for i in range(4 * cap)))
    statuses = [status for status, *_ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= cap
    for status, headers, text, streamed in results:
        assert_no_leak(text)
        if status == 429:
            assert headers["Retry-After"] == "1"
            assert assert_envelope(json.loads(text), "rate_limit_exceeded")["type"] == "requests"
        elif streamed:
            events = sse_payloads(text, strict=False)
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] == "stop"
    assert admission(client).in_flight == 0
    assert (await client.post(CHAT, json=NORMAL_REQUEST)).status == 200


@per_generating_route
async def test_requests_above_the_cap_get_429_and_the_admitted_ones_are_counted(make_client, path):
    cap, above = 2, 6
    backend = HangingBackend()
    client = await make_client(backend, max_concurrent_requests=cap)
    holders = [asyncio.ensure_future(client.post(path, json=streamed(path))) for _ in range(cap)]
    await wait_until_async(lambda: len(backend.requests) == cap, timeout=5)
    assert admission(client).in_flight == cap  # what a shutdown's drain waits for
    rng = random.Random(20)
    bodies = [rng.choice([streamed(path), GENERATING_REQUESTS[path]]) for _ in range(above)]
    responses = await asyncio.gather(*(client.post(path, json=body) for body in bodies))
    for response in responses:
        assert response.status == 429 and response.headers["Retry-After"] == "1"
        assert_route_envelope(path, await response.json(), "rate_limit_exceeded")
    assert len(backend.requests) == cap
    for holder in holders:
        holder.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    await wait_until_async(lambda: admission(client).in_flight == 0, timeout=5)


@per_generating_route
async def test_429_is_decided_before_the_body_is_read(make_client, path):
    backend = HangingBackend()
    client = await make_client(backend, max_concurrent_requests=1)
    holder = asyncio.ensure_future(client.post(path, json=streamed(path)))
    await wait_until_async(lambda: backend.requests, timeout=5)
    # Only the head of a 50 MB request: the 429 comes without waiting for its body.
    head = post_head(path, length=50_000_000)
    status, headers, body = await raw_http(client.server.port, head)
    assert status == 429 and headers["retry-after"] == "1"
    assert_route_envelope(path, json.loads(body), "rate_limit_exceeded")
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await asyncio.wait_for(backend.stopped_early.wait(), 5)


@per_generating_route
async def test_a_slow_body_does_not_hold_a_slot(make_client, path):
    client = await make_client(FakeBackend(), max_concurrent_requests=1, request_body_timeout_s=0.3)
    status, _, body = await raw_http(client.server.port, post_head(path, length=1000) + b'{"mess')
    assert status == 408
    assert_route_envelope(path, json.loads(body), "request_timeout")
    assert admission(client).in_flight == 0
    assert (await client.post(path, json=GENERATING_REQUESTS[path])).status == 200


# ---- backend errors ------------------------------------------------------------------------


def busy():
    busy = ModelError("busy", "64 requests are waiting").encode()
    return model_error(InferenceServerException(msg=busy), "r")


async def test_model_busy_is_503_with_retry_after_before_streaming(make_client):
    client = await make_client(FakeBackend(error_at=0, error=busy()))
    response = await client.post(CHAT, json=STREAM_REQUEST)
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert_envelope(await response.json(), "server_busy")


async def test_backend_failure_mid_stream_is_an_sse_error_then_done(make_client):
    client = await make_client(FakeBackend(error_at=2, error=busy()))
    response = await client.post(CHAT, json=STREAM_REQUEST)
    assert response.status == 200
    events = await read_stream(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "server_busy"


async def test_unexpected_backend_exception_is_a_generic_500_and_the_next_request_works(
    make_client,
):
    secret = RuntimeError("CUDA error at /opt/torch/lib.py:12 0x7fdeadbeef00 10.1.2.3")
    backend = FakeBackend(error_at=0, error=secret)
    client = await make_client(backend)
    response = await client.post(CHAT, json=NORMAL_REQUEST)
    text = await response.text()
    assert response.status == 500
    assert_no_leak(text)
    assert response.headers["X-Request-Id"] in text  # the id to quote to the operator
    backend.error_at = None
    assert (await client.post(CHAT, json=NORMAL_REQUEST)).status == 200


# ---- deadlines -----------------------------------------------------------------------------


@per_generating_route
async def test_deadline_before_the_first_chunk_is_a_504_envelope(make_client, path):
    backend = HangingBackend(before=0)
    client = await make_client(backend, request_timeout_s=0.3)
    for body in (GENERATING_REQUESTS[path], streamed(path)):
        response = await client.post(path, json=body)
        assert response.status == 504
        assert_route_envelope(path, await response.json(), "timeout")
    await asyncio.wait_for(backend.stopped_early.wait(), 1)  # the generation was cancelled


async def test_idle_stream_is_an_sse_error_and_done(make_client):
    backend = HangingBackend(before=2)
    client = await make_client(backend, stream_idle_timeout_s=0.3)
    response = await client.post(CHAT, json=STREAM_REQUEST)
    assert response.status == 200
    events = await read_stream(response)
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", " world"]
    assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert backend.stopped_early.is_set()


async def test_first_chunk_may_take_longer_than_the_idle_timeout(make_client):
    backend = FakeBackend(delay_s=0.0)
    backend.chunks = script("a", "b")

    async def slow_first(request, request_id):
        await asyncio.sleep(0.5)
        for chunk in backend.chunks:
            yield chunk

    backend.generate = slow_first
    client = await make_client(backend, stream_idle_timeout_s=0.2)
    response = await client.post(CHAT, json=STREAM_REQUEST)
    assert (await read_stream(response))[-1] == "[DONE]"


@pytest.fixture
def short_backstop(monkeypatch):
    """The backstop past the deadline, 2 s in production, at 0.2 s: the tests below wait it
    out, and what they prove (the backstop ends what the deadline alone cannot) is the same."""
    monkeypatch.setattr(admission_module, "DEADLINE_BACKSTOP_S", 0.2)


async def test_a_stuck_image_fetch_is_ended_by_the_deadline(short_backstop):
    class StuckFetcher:
        async def fetch_all(self, refs):
            await asyncio.Event().wait()

    config = with_settings(TEST_CONFIG, request_timeout_s=0.2)
    async with serving(config, FakeBackend(), fetcher=StuckFetcher()) as client:
        part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        response = await client.post(CHAT, json={"messages": [{"role": "user", "content": [part]}]})
        assert response.status == 504  # at the deadline plus the backstop
        assert_envelope(await response.json(), "timeout")
        assert admission(client).in_flight == 0


async def test_a_client_that_stops_reading_loses_its_connection_at_the_deadline(
    make_client, short_backstop
):
    big = "x" * 256 * 1024
    backend = FakeBackend(script(*[big] * 400))  # 100 MB of stream: more than socket buffers
    client = await make_client(backend, request_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    body = json_bytes(STREAM_REQUEST)
    writer.write(post_head(length=len(body)) + body)  # ... and never read the answer
    await writer.drain()
    await wait_until_async(lambda: backend.requests, timeout=5)
    # The deadline (0.5 s) and the backstop, with room to spare.
    await wait_until_async(lambda: admission(client).in_flight == 0, timeout=10)
    assert backend.stopped_early.is_set() and not backend.finished
    writer.close()
    backend.chunks = script("still", " serving")  # not another 100 MB, read in full this time
    assert (await client.post(CHAT, json=NORMAL_REQUEST)).status == 200


# ---- draining ------------------------------------------------------------------------------


@per_generating_route
async def test_draining_refuses_new_work_and_says_not_ready(make_client, path):
    client = await make_client(FakeBackend())
    admission(client).draining = True
    response = await client.post(path, json=GENERATING_REQUESTS[path])
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert_route_envelope(path, await response.json(), "server_shutting_down")
    assert (await client.get("/ready")).status == 503
    assert (await client.get("/health")).status == 200
    assert (await client.get("/v1/models")).status == 200


async def test_aborting_ends_running_streams_with_an_error_and_done(make_client):
    backend = HangingBackend(before=1)
    client = await make_client(backend)
    pending = asyncio.ensure_future(client.post(CHAT, json=STREAM_REQUEST))
    plain = asyncio.ensure_future(client.post(CHAT, json=NORMAL_REQUEST))
    await wait_until_async(lambda: len(backend.requests) == 2, timeout=5)
    await asyncio.sleep(0.05)
    admission(client).abort_streams()
    response = await pending
    events = await read_stream(response)
    assert events[-2]["error"]["code"] == "server_shutting_down" and events[-1] == "[DONE]"
    response = await plain
    assert response.status == 503
    assert_envelope(await response.json(), "server_shutting_down")


async def test_raw_body_is_read_once(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    status, _, body = await raw_http(
        client.server.port,
        post_head(length=len(json_bytes(NORMAL_REQUEST))) + json_bytes(NORMAL_REQUEST),
    )
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
