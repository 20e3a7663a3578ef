"""GET /metrics after real requests through the real app: every number moves exactly as the
requests say (a scripted backend makes the token counts known)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from helpers import data_url, sse_payloads, wait_until_async
from prometheus_client.parser import text_string_to_metric_families
from proxy_fakes import (
    MP4_BYTES,
    SERVED_MODEL,
    TEST_CONFIG,
    FakeBackend,
    script,
    serving,
    serving_app,
)
from sample_images import encoded_image

from proxy.app import create_app
from proxy.errors import APIError
from proxy.media.images import IMAGE
from proxy.media.kinds import MediaRef
from proxy.observability.logs import JsonFormatter
from proxy.observability.metrics import CAUSES
from proxy.transport.backend import backend_unavailable

CHAT = "/v1/chat/completions"
TEXT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}
P = "qwen_vl_proxy_"
PNG_BYTES = encoded_image("PNG", size=(40, 30))
JPEG_BYTES = encoded_image("JPEG", size=(56, 28))

Samples = dict[tuple[str, frozenset], float]


async def scrape(client: TestClient) -> Samples:
    """Every sample of GET /metrics."""
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((P + name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(v for (sample, _), v in samples.items() if sample == P + name)


def image_request(*urls: str, stream: bool = False) -> dict:
    parts = [{"type": "text", "text": "what is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"stream": stream, "messages": [{"role": "user", "content": parts}]}


# ---- the endpoint ----------------------------------------------------------------------


async def test_metrics_is_prometheus_text_with_every_metric_declared(make_client):
    client = await make_client()
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(await resp.text())}
    assert {
        P + "requests",
        P + "requests_in_flight",
        P + "request_duration_seconds",
        P + "time_to_first_token_seconds",
        P + "inter_token_latency_seconds",
        P + "prompt_tokens",
        P + "completion_tokens",
        P + "image_tokens",
        P + "media_parts",
        P + "media_fetch_seconds",
        P + "media_check_seconds",
        P + "images",
        P + "image_fetch_seconds",
        P + "image_decode_seconds",
        P + "client_disconnects",
        P + "rejected_requests",
        "process_resident_memory_bytes",
        "python_info",
    } <= names
    samples = await scrape(client)
    # Every cause exists from the start at 0, so rate() works before the first error.
    assert all(value(samples, "rejected_requests_total", cause=c) == 0 for c in CAUSES)
    assert value(samples, "requests_in_flight") == 0
    assert not any(name.endswith("_created") for name, _ in samples)


async def test_openmetrics_when_the_scraper_asks_for_it(make_client):
    client = await make_client()
    resp = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_each_app_has_its_own_registry(make_client):
    first, second = await make_client(), await make_client()
    await first.post(CHAT, json=TEXT_REQUEST)
    assert value(await scrape(first), "completion_tokens_total", model=SERVED_MODEL) == 3
    assert value(await scrape(second), "completion_tokens_total", model=SERVED_MODEL) == 0


# ---- requests, tokens, latency ---------------------------------------------------------


async def test_non_stream_counts_request_tokens_and_duration(make_client):
    client = await make_client(FakeBackend(script("a", "b", "c", "d", prompt_tokens=11)))
    before = await scrape(client)

    resp = await client.post(CHAT, json=TEXT_REQUEST)
    usage = (await resp.json())["usage"]

    after = await scrape(client)
    route = {"route": CHAT, "method": "POST", "status": "200"}
    assert delta(before, after, "requests_total", **route) == 1
    assert delta(before, after, "prompt_tokens_total", model=SERVED_MODEL) == 11
    assert delta(before, after, "prompt_tokens_total", model=SERVED_MODEL) == usage["prompt_tokens"]
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) == 4
    assert (
        delta(before, after, "completion_tokens_total", model=SERVED_MODEL)
        == usage["completion_tokens"]
    )
    assert delta(before, after, "request_duration_seconds_count", route=CHAT) == 1
    assert delta(before, after, "request_duration_seconds_sum", route=CHAT) > 0
    # TTFT and gaps are stream measures: a non-streamed completion arrives in one piece.
    assert delta(before, after, "time_to_first_token_seconds_count", model=SERVED_MODEL) == 0
    assert delta(before, after, "inter_token_latency_seconds_count", model=SERVED_MODEL) == 0
    assert value(after, "requests_in_flight") == 0
    assert total(after, "rejected_requests_total") == 0


async def test_stream_counts_ttft_once_and_each_gap_between_chunks(make_client):
    chunks = script("one", " two", " three", " four", " five", prompt_tokens=20, image_tokens=4)
    client = await make_client(FakeBackend(chunks, delay_s=0.02))
    before = await scrape(client)

    resp = await client.post(
        CHAT,
        json={
            **image_request(data_url(PNG_BYTES), stream=True),
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_payloads(await resp.text())
    usage = events[-2]["usage"]

    after = await scrape(client)
    assert usage == {
        "prompt_tokens": 20,
        "completion_tokens": 5,
        "total_tokens": 25,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 4},
    }
    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="200") == 1
    assert delta(before, after, "prompt_tokens_total", model=SERVED_MODEL) == 20
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) == 5
    assert delta(before, after, "image_tokens_total", model=SERVED_MODEL) == 4
    assert delta(before, after, "time_to_first_token_seconds_count", model=SERVED_MODEL) == 1
    assert delta(before, after, "inter_token_latency_seconds_count", model=SERVED_MODEL) == 4
    # Four gaps of at least the backend's 20 ms delay.
    assert delta(before, after, "inter_token_latency_seconds_sum", model=SERVED_MODEL) >= 0.08
    ttft = delta(before, after, "time_to_first_token_seconds_sum", model=SERVED_MODEL)
    duration = delta(before, after, "request_duration_seconds_sum", route=CHAT)
    assert 0 < ttft < duration
    assert value(after, "requests_in_flight") == 0


async def test_histogram_counts_equal_request_counts(make_client):
    client = await make_client(FakeBackend(script("x", "y", prompt_tokens=3)))
    before = await scrape(client)

    for stream in (True, False, True, True, False):
        resp = await client.post(CHAT, json={**TEXT_REQUEST, "stream": stream})
        assert resp.status == 200
        await resp.read()
    for _ in range(2):
        assert (await client.get("/health")).status == 200

    after = await scrape(client)
    ok = {"route": CHAT, "method": "POST", "status": "200"}
    assert delta(before, after, "requests_total", **ok) == 5
    assert delta(before, after, "request_duration_seconds_count", route=CHAT) == 5
    assert delta(before, after, "requests_total", route="/health", method="GET", status="200") == 2
    assert delta(before, after, "request_duration_seconds_count", route="/health") == 2
    assert delta(before, after, "time_to_first_token_seconds_count", model=SERVED_MODEL) == 3
    assert delta(before, after, "inter_token_latency_seconds_count", model=SERVED_MODEL) == 3
    assert delta(before, after, "prompt_tokens_total", model=SERVED_MODEL) == 5 * 3
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) == 5 * 2
    # The +Inf bucket of a histogram is its count.
    assert (
        delta(before, after, "time_to_first_token_seconds_bucket", model=SERVED_MODEL, le="+Inf")
        == 3
    )


async def test_in_flight_counts_running_requests_and_returns_to_zero(make_client):
    backend = FakeBackend(script(*(f"t{i}" for i in range(10))), delay_s=0.05)
    client = await make_client(backend)

    requests = [
        asyncio.create_task(client.post(CHAT, json={**TEXT_REQUEST, "stream": s}))
        for s in (True, False)
    ]

    async def both_running() -> bool:
        return value(await scrape(client), "requests_in_flight") == 2

    await wait_until_async(both_running, timeout=3)
    for resp in await asyncio.gather(*requests):
        await resp.read()
    assert value(await scrape(client), "requests_in_flight") == 0


async def test_routes_are_templates_not_paths(make_client):
    client = await make_client()
    before = await scrape(client)
    for name in ("a", "b/c", "d"):
        await client.get(f"/v1/models/{name}")
    await client.get("/no/such/route/12345")
    await client.request("PROPFIND", "/health")

    after = await scrape(client)
    models = {"route": "/v1/models/{model}", "method": "GET", "status": "404"}
    assert delta(before, after, "requests_total", **models) == 3
    assert (
        delta(before, after, "requests_total", route="unmatched", method="GET", status="404") == 1
    )
    assert (
        delta(before, after, "requests_total", route="unmatched", method="other", status="405") == 1
    )
    routes = {dict(labels).get("route") for name, labels in after if name == P + "requests_total"}
    assert routes <= {CHAT, "/v1/models/{model}", "unmatched", "/metrics", "/health"}


# ---- images ----------------------------------------------------------------------------


class SlowFetcher:
    """A MediaFetcher that takes `delay_s` and returns a PNG per image URL, an MP4 per video
    URL."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def fetch_all(self, refs: Sequence[MediaRef]) -> list[bytes]:
        await asyncio.sleep(self.delay_s)
        return [PNG_BYTES if ref.kind is IMAGE else MP4_BYTES for ref in refs]


async def test_image_fetch_and_decode_are_timed_per_request():
    backend = FakeBackend(script("ok", prompt_tokens=30, image_tokens=12))
    async with serving(TEST_CONFIG, backend, fetcher=SlowFetcher(0.1)) as client:
        before = await scrape(client)
        body = image_request(
            data_url(PNG_BYTES),
            "https://images.example/cat.png",
            data_url(JPEG_BYTES, "image/jpeg"),
            "https://images.example/dog.png",
        )
        resp = await client.post(CHAT, json=body)
        assert resp.status == 200
        usage = (await resp.json())["usage"]
        after = await scrape(client)

    assert delta(before, after, "images_total", source="inline") == 2
    assert delta(before, after, "images_total", source="remote") == 2
    assert delta(before, after, "image_fetch_seconds_count") == 1
    assert delta(before, after, "image_fetch_seconds_sum") >= 0.1
    assert delta(before, after, "image_decode_seconds_count") == 1
    assert 0 < delta(before, after, "image_decode_seconds_sum") < 0.1
    for source in ("inline", "remote"):
        assert delta(before, after, "media_parts_total", kind="image", source=source) == 2
    assert delta(before, after, "media_fetch_seconds_count", kind="image") == 1
    assert delta(before, after, "media_check_seconds_count", kind="image") == 1
    image_tokens = usage["prompt_tokens_details"]["image_tokens"]
    assert delta(before, after, "image_tokens_total", model=SERVED_MODEL) == image_tokens == 12


async def test_inline_only_requests_do_not_count_a_fetch(make_client):
    client = await make_client()
    before = await scrape(client)
    await client.post(CHAT, json=image_request(data_url(PNG_BYTES)))
    await client.post(CHAT, json=TEXT_REQUEST)
    after = await scrape(client)
    assert delta(before, after, "image_fetch_seconds_count") == 0
    assert delta(before, after, "image_decode_seconds_count") == 1
    assert delta(before, after, "images_total", source="inline") == 1


async def test_video_parts_are_counted_as_videos_and_timed_by_the_requests_kind():
    video = {"type": "video_url", "video_url": {"url": "https://media.example/a.mp4"}}
    inline_video = {"type": "video_url", "video_url": {"url": data_url(MP4_BYTES, "video/mp4")}}
    image = {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES)}}
    async with serving(TEST_CONFIG, FakeBackend(), fetcher=SlowFetcher(0.0)) as client:
        before = await scrape(client)
        for parts in ([inline_video, video], [image, video]):
            body = {"messages": [{"role": "user", "content": parts}]}
            assert (await client.post(CHAT, json=body)).status == 200
        after = await scrape(client)

    parts = {
        (kind, source): delta(before, after, "media_parts_total", kind=kind, source=source)
        for kind in ("image", "video")
        for source in ("inline", "remote")
    }
    assert parts == {
        ("image", "inline"): 1,
        ("image", "remote"): 0,
        ("video", "inline"): 1,
        ("video", "remote"): 2,
    }
    assert delta(before, after, "images_total", source="inline") == 1
    assert delta(before, after, "images_total", source="remote") == 0
    for histogram in ("media_fetch_seconds_count", "media_check_seconds_count"):
        counts = [delta(before, after, histogram, kind=k) for k in ("image", "video", "mixed")]
        assert counts == [0, 1, 1], histogram
    assert delta(before, after, "image_fetch_seconds_count") == 0
    assert delta(before, after, "image_decode_seconds_count") == 0


# ---- rejections ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_kwargs, status, cause",
    [
        ({"data": b"{not json"}, 400, "invalid_request"),
        ({"json": {"messages": []}}, 400, "invalid_request"),
        ({"json": {**TEXT_REQUEST, "model": "gpt-4"}}, 404, "not_found"),
        ({"json": image_request("data:image/png;base64,@@@")}, 400, "invalid_request"),
        ({"data": b"x" * 2048}, 413, "body_too_large"),
    ],
)
async def test_rejections_are_counted_by_cause(make_client, request_kwargs, status, cause):
    client = await make_client(max_request_bytes=1024)
    before = await scrape(client)

    # The proxy may close the connection after a refused body; the scrape takes a new one.
    resp = await client.post(CHAT, headers={"Connection": "close"}, **request_kwargs)
    assert resp.status == status

    after = await scrape(client)
    assert delta(before, after, "rejected_requests_total", cause=cause) == 1
    assert total(after, "rejected_requests_total") - total(before, "rejected_requests_total") == 1
    assert (
        delta(before, after, "requests_total", route=CHAT, method="POST", status=str(status)) == 1
    )
    assert value(after, "requests_in_flight") == 0
    assert total(after, "completion_tokens_total") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_unavailable_before_the_first_token(make_client, stream):
    client = await make_client(FakeBackend(error_at=0, error=backend_unavailable()))
    before = await scrape(client)
    resp = await client.post(CHAT, json={**TEXT_REQUEST, "stream": stream})
    assert resp.status == 503
    after = await scrape(client)
    assert delta(before, after, "rejected_requests_total", cause="backend_unavailable") == 1
    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="503") == 1


async def stream_ending_in_an_error(client: TestClient) -> tuple[str, Samples, Samples]:
    """A streamed request that starts (200) and ends in an SSE error event: the event's code,
    and the metrics before and after it."""
    before = await scrape(client)
    resp = await client.post(CHAT, json={**TEXT_REQUEST, "stream": True})
    assert resp.status == 200
    code = sse_payloads(await resp.text())[-2]["error"]["code"]
    return code, before, await scrape(client)


async def test_an_error_mid_stream_is_counted_with_the_tokens_before_it(make_client):
    backend = FakeBackend(
        script("a", "b", "c", "d", prompt_tokens=6), error_at=2, error=backend_unavailable()
    )
    client = await make_client(backend)
    code, before, after = await stream_ending_in_an_error(client)
    assert code == "backend_unavailable"
    assert delta(before, after, "rejected_requests_total", cause="backend_unavailable") == 1
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) == 2
    assert delta(before, after, "client_disconnects_total", route=CHAT) == 0


async def test_unexpected_exception_is_an_internal_error(make_client):
    client = await make_client(FakeBackend(error_at=1, error=RuntimeError("boom")))
    before = await scrape(client)
    assert (await client.post(CHAT, json=TEXT_REQUEST)).status == 500
    after = await scrape(client)
    assert delta(before, after, "rejected_requests_total", cause="internal_error") == 1


def failing_middleware(error: APIError):
    """Stands for errors other middlewares add later (auth, limits, timeouts)."""

    @web.middleware
    async def fail(request: web.Request, handler):
        if request.path == CHAT:
            raise error
        return await handler(request)

    return fail


@pytest.mark.parametrize(
    "error, cause",
    [
        (APIError(401, "no key", code="invalid_api_key"), "auth"),
        (APIError(403, "forbidden"), "auth"),
        (APIError(429, "slow down", code="rate_limit_exceeded"), "rate_limited"),
        (APIError(503, "busy", code="server_busy"), "overloaded"),
        (APIError(504, "too slow", code="generation_timeout"), "timeout"),
        (APIError(408, "too slow"), "timeout"),
        (APIError(503, "nope", code="something_new"), "backend_unavailable"),
    ],
)
async def test_errors_from_other_middlewares_are_counted_by_their_envelope(error, cause):
    app = create_app(TEST_CONFIG, FakeBackend())
    app.middlewares.append(failing_middleware(error))  # inside error_middleware, like theirs
    async with serving_app(app) as client:
        before = await scrape(client)
        resp = await client.post(CHAT, json=TEXT_REQUEST)
        assert resp.status == error.status
        after = await scrape(client)
    assert delta(before, after, "rejected_requests_total", cause=cause) == 1


# ---- disconnects -----------------------------------------------------------------------


async def disconnect_counted(client: TestClient, before: Samples) -> Samples:
    """The metrics once the proxy has counted one client disconnect since `before`."""

    async def counted() -> bool:
        return delta(before, await scrape(client), "client_disconnects_total", route=CHAT) == 1

    await wait_until_async(counted, timeout=3, what="the disconnect to be counted")
    return await scrape(client)


async def _disconnect_mid_stream(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url, json={**TEXT_REQUEST, "stream": True})
        assert resp.status == 200
        await resp.content.readuntil(b'"content":"t1"')
        resp.close()


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_disconnect_mid_stream_is_a_cancellation_not_a_rejection(handler_cancellation):
    backend = FakeBackend(script(*(f"t{i}" for i in range(100))), delay_s=0.05)
    async with serving(TEST_CONFIG, backend, handler_cancellation=handler_cancellation) as client:
        before = await scrape(client)
        await _disconnect_mid_stream(str(client.make_url(CHAT)))
        after = await disconnect_counted(client, before)

    assert backend.stopped_early.is_set() and not backend.finished
    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="499") == 1
    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="200") == 0
    assert total(after, "rejected_requests_total") == total(before, "rejected_requests_total")
    assert value(after, "requests_in_flight") == 0
    # The tokens generated before the disconnect were generated: they count.
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) >= 2
    assert delta(before, after, "time_to_first_token_seconds_count", model=SERVED_MODEL) == 1


async def test_a_disconnect_while_waiting_for_a_non_streamed_answer_is_a_cancellation():
    backend = FakeBackend(script(*(f"t{i}" for i in range(100))), delay_s=0.05)
    async with serving(TEST_CONFIG, backend) as client:
        before = await scrape(client)
        async with aiohttp.ClientSession() as doomed:
            with pytest.raises(asyncio.TimeoutError):
                await doomed.post(
                    client.make_url(CHAT),
                    json=TEXT_REQUEST,
                    timeout=aiohttp.ClientTimeout(total=0.3),
                )
        after = await disconnect_counted(client, before)

    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="499") == 1
    assert total(after, "rejected_requests_total") == total(before, "rejected_requests_total")
    assert value(after, "requests_in_flight") == 0


# ---- the request log line --------------------------------------------------------------


def request_lines(caplog, request_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "proxy.access" and getattr(r, "fields", {}).get("request_id") == request_id
    ]


async def test_one_structured_line_per_streamed_request(make_client, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    backend = FakeBackend(script("a", "b", "c", prompt_tokens=40, image_tokens=16), delay_s=0.01)
    client = await make_client(backend)

    resp = await client.post(
        CHAT,
        json=image_request(data_url(PNG_BYTES), stream=True),
        headers={"X-Request-Id": "trace-42"},
    )
    await resp.read()

    (line,) = request_lines(caplog, "trace-42")
    fields = line.fields
    assert {k: v for k, v in fields.items() if k not in ("ttft_ms", "duration_ms")} == {
        "request_id": "trace-42",
        "method": "POST",
        "path": CHAT,
        "route": CHAT,
        "status": 200,
        "model": SERVED_MODEL,
        "stream": True,
        "prompt_tokens": 40,
        "completion_tokens": 3,
        "image_tokens": 16,
    }
    assert 0 < fields["ttft_ms"] < fields["duration_ms"]
    text = line.getMessage()
    assert text.startswith(f"request trace-42 POST {CHAT} -> 200 ")
    assert "stream=true" in text and "image_tokens=16" in text and "ttft_ms=" in text
    assert backend.requests[0][1] == "trace-42"  # the id Triton gets: its log line joins


async def test_json_log_line_of_a_rejection_has_its_cause(make_client, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    client = await make_client()
    resp = await client.post(CHAT, data=b"{oops", headers={"X-Request-Id": "bad-1"})
    assert resp.status == 400

    (line,) = request_lines(caplog, "bad-1")
    entry = json.loads(JsonFormatter().format(line))
    assert entry["message"] == "request"
    assert entry["logger"] == "proxy.access" and entry["level"] == "INFO"
    assert entry["request_id"] == "bad-1"
    assert entry["status"] == 400
    assert entry["cause"] == "invalid_request" and entry["code"] == "invalid_json"
    assert entry["model"] is None and entry["prompt_tokens"] is None and entry["ttft_ms"] is None
    assert "cause=invalid_request code=invalid_json" in line.getMessage()


# ---- with the hardening middlewares (auth, admission, stream timeouts) -----------------


async def test_metrics_needs_no_key_unless_metrics_require_auth(make_client):
    open_metrics = await make_client(api_key="sekrit")
    assert (await open_metrics.get("/metrics")).status == 200
    before = await scrape(open_metrics)
    assert (await open_metrics.post(CHAT, json=TEXT_REQUEST)).status == 401
    after = await scrape(open_metrics)
    assert delta(before, after, "rejected_requests_total", cause="auth") == 1

    closed = await make_client(api_key="sekrit", metrics_require_auth=True)
    assert (await closed.get("/metrics")).status == 401
    resp = await closed.get("/metrics", headers={"Authorization": "Bearer sekrit"})
    assert resp.status == 200 and P + "rejected_requests_total" in await resp.text()


async def test_over_capacity_is_counted_as_rate_limited(make_client):
    backend = FakeBackend(script(*(f"t{i}" for i in range(6))), delay_s=0.05)
    client = await make_client(backend, max_concurrent_requests=1)
    before = await scrape(client)
    first = asyncio.create_task(client.post(CHAT, json=TEXT_REQUEST))
    await asyncio.sleep(0.1)
    second = await client.post(CHAT, json=TEXT_REQUEST)
    assert second.status == 429
    assert (await first).status == 200
    after = await scrape(client)
    assert delta(before, after, "rejected_requests_total", cause="rate_limited") == 1
    assert delta(before, after, "requests_total", route=CHAT, method="POST", status="429") == 1
    assert value(after, "requests_in_flight") == 0


async def test_a_stalled_stream_is_a_timeout_not_a_disconnect(make_client):
    backend = FakeBackend(script("a", "b", "c"), delay_s=1.0)
    client = await make_client(backend, stream_idle_timeout_s=0.2)
    code, before, after = await stream_ending_in_an_error(client)
    assert code == "timeout"
    assert delta(before, after, "rejected_requests_total", cause="timeout") == 1
    assert delta(before, after, "client_disconnects_total", route=CHAT) == 0
    assert delta(before, after, "completion_tokens_total", model=SERVED_MODEL) == 1
