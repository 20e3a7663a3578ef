"""`python -m proxy --workers 2` in front of the fake Triton (tests/proxy/fake_triton.py): both
workers serve the one port, /metrics counts every worker's requests, the in-flight cap is the
whole proxy's, SIGTERM drains every worker and the parent exits 0; a worker that cannot start
stops the proxy. And a worker's app alone: the shared cap, /ready waiting for every worker."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
from hardening_helpers import CHAT, assert_envelope
from helpers import sse_payloads, wait_until_async
from prometheus_client.parser import text_string_to_metric_families
from proxy_fakes import SERVED_MODEL, TEST_CONFIG, FakeBackend, serving_app
from proxy_process import ProxyProcess

from proxy.app import create_app
from proxy.serving.admission import AdmissionSettings
from proxy.serving.workers import SharedAdmission, WorkerSlot, as_worker

WORKERS = 2
CAP = 3  # --max-concurrent-requests: the streams the drain test holds open
# Fresh connections tried until each worker has served one. The kernel picks a worker per
# connection by a hash of its addresses: 64 on one worker out of two has a 2**-63 chance.
MAX_CONNECTIONS = 64


def workers_proxy(triton_port: int, log_path: Path, port: int | None = None) -> ProxyProcess:
    """`python -m proxy --workers 2` with the in-flight cap the drain test fills."""
    return ProxyProcess(
        triton_port,
        log_path,
        f"--workers={WORKERS}",
        f"--max-concurrent-requests={CAP}",
        port=port,
    )


def chat(script: str, *, stream: bool) -> dict:
    return {
        "model": SERVED_MODEL,
        "stream": stream,
        "messages": [{"role": "user", "content": script}],
    }


@pytest.fixture
async def session():
    # force_close: a fresh connection per request, so the kernel picks a worker for each.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


CHAT_OK = (
    "qwen_vl_proxy_requests_total",
    (("method", "POST"), ("route", CHAT), ("status", "200")),
)
IN_FLIGHT = ("qwen_vl_proxy_requests_in_flight", ())


def test_workers_admit_up_to_one_cap_together():
    in_flight = [0, 0]  # shared memory between workers; a list within one process
    settings = AdmissionSettings(max_concurrent_requests=CAP)
    first, second = (
        SharedAdmission(settings, WorkerSlot(index, in_flight, [1, 1])) for index in range(2)
    )
    assert first.try_enter() and first.try_enter() and second.try_enter()
    assert not second.try_enter() and not first.try_enter()
    assert in_flight == [2, 1] and (first.in_flight, second.in_flight) == (2, 1)
    first.leave()
    assert second.try_enter() and in_flight == [1, 2]
    assert not first.try_enter()


async def test_ready_only_when_every_worker_has_seen_the_model():
    slot = WorkerSlot(0, [0, 0], [0, 0])  # the other worker has not seen the model yet
    app = create_app(TEST_CONFIG, FakeBackend())
    as_worker(app, slot)
    async with serving_app(app) as client:
        await wait_until_async(lambda: slot.ready[0] == 1)  # this worker's own poll
        response = await client.get("/ready")
        assert response.status == 503
        assert_envelope(await response.json(), "model_not_ready")
        slot.ready[1] = 1
        assert (await client.get("/ready")).status == 200


async def test_two_workers_serve_one_port_share_the_cap_and_metrics_and_drain(
    fake_triton, session, tmp_path
):
    proxy = workers_proxy(fake_triton.port, tmp_path / "proxy.log")
    await proxy.start()
    try:
        await proxy.wait_ready(session)
        sent = 0
        # Each worker has a gRPC channel of its own: one client address per worker in Triton.
        while len(set(fake_triton.state.peers)) < WORKERS and sent < MAX_CONNECTIONS:
            async with session.post(proxy.url + CHAT, json=chat("tokens=2", stream=False)) as r:
                assert r.status == 200, await r.text()
            sent += 1
        assert len(set(fake_triton.state.peers)) == WORKERS, proxy.log()
        # Whichever worker answers the scrape counts the requests of both.
        assert (await scrape(session, proxy.url))[CHAT_OK] == sent

        streams = []
        for _ in range(CAP):
            response = await session.post(
                proxy.url + CHAT, json=chat("tokens=10 delay=0.1", stream=True)
            )
            assert response.status == 200
            await response.content.readuntil(b"\n\n")  # headers and the role chunk are out
            streams.append(response)
        assert (await scrape(session, proxy.url))[IN_FLIGHT] == CAP  # live workers, summed
        for _ in range(WORKERS):  # whichever worker takes it, the proxy is full
            async with session.post(proxy.url + CHAT, json=chat("tokens=1", stream=False)) as r:
                assert r.status == 429, await r.text()

        proxy.process.send_signal(signal.SIGTERM)
        for response in streams:
            events = sse_payloads((await response.read()).decode(), strict=False)
            assert events[-1] == "[DONE]"
            deltas = [event["choices"][0]["delta"] for event in events[:-1]]
            assert "".join(d.get("content", "") for d in deltas).split() == [
                f"t{i}" for i in range(10)
            ]
        assert await asyncio.wait_for(proxy.process.wait(), 20) == 0, proxy.log()
        assert proxy.log().count("SIGTERM: draining") == WORKERS  # each worker drained
        assert fake_triton.state.cancelled == 0
    finally:
        await proxy.kill()


async def test_a_worker_that_cannot_start_stops_the_proxy(fake_triton, tmp_path):
    with socket.socket() as taken:  # listening without SO_REUSEPORT: no worker can join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proxy = workers_proxy(fake_triton.port, tmp_path / "proxy.log", taken.getsockname()[1])
        await proxy.start()
        try:
            assert await asyncio.wait_for(proxy.process.wait(), 60) != 0, proxy.log()
            assert "while starting; stopping all" in proxy.log()
        finally:
            await proxy.kill()
