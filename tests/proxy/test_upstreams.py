"""One proxy over many Triton replicas: least-busy choice, retry before the first token,
DNS re-resolution, and two fake Tritons over real gRPC with one killed mid-load."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from fake_triton import FakeTriton
from helpers import sse_payloads
from proxy_fakes import SERVED_MODEL, TEST_CONFIG, FakeBackend, script, serving
from stack import free_port

from proxy.config import with_settings
from proxy.error_catalogue import BACKEND_UNAVAILABLE, APIError
from proxy.transport import upstreams as upstreams_module
from proxy.transport.backend import TritonRequest
from proxy.transport.upstreams import DOWN_FOR_S, Upstreams, parse_targets

REQUEST = TritonRequest("m", "[]", {}, {}, stream=True)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(backends: dict[str, FakeBackend], clock=None, resolve=None) -> Upstreams:
    """Upstreams over fake backends, one per address `host:1`."""

    async def resolve_all(host: str, port: int) -> list[str]:
        return list(dict.fromkeys(a.rsplit(":", 1)[0] for a in backends))

    return Upstreams(
        [("replicas", 1)],
        resolve=resolve or resolve_all,
        backend_factory=lambda address: backends[address],
        clock=clock or Clock(),
        resolve_every_s=0,
    )


async def run(upstreams: Upstreams) -> str:
    return "".join([chunk.text async for chunk in upstreams.generate(REQUEST, "r")])


def test_targets_parse():
    assert parse_targets("a:8001, [::1]:9001,b.example:1") == [
        ("a", 8001),
        ("::1", 9001),
        ("b.example", 1),
    ]
    for bad in ("", "a", "a:b", ":80"):
        with pytest.raises(ValueError):
            parse_targets(bad)


async def test_concurrent_requests_spread_by_fewest_in_flight():
    backends = {f"10.0.0.{i}:1": FakeBackend(script("a", "b", "c"), delay_s=0.02) for i in (1, 2)}
    upstreams = pool(backends)
    await asyncio.gather(*(run(upstreams) for _ in range(8)))
    assert [len(b.requests) for b in backends.values()] == [4, 4]


async def test_a_failure_before_the_first_token_is_retried_once_elsewhere():
    clock = Clock()
    down = FakeBackend(error_at=0, error=BACKEND_UNAVAILABLE())
    backends = {"10.0.0.1:1": down, "10.0.0.2:1": FakeBackend(script("ok"))}
    upstreams = pool(backends, clock)
    assert await run(upstreams) == "ok"
    assert await run(upstreams) == "ok"
    assert len(down.requests) == 1  # marked down: the second request went elsewhere at once
    clock.now += DOWN_FOR_S
    upstreams.pick()  # back in the pool after the pause
    assert upstreams.pick().address == "10.0.0.1:1"


async def test_nothing_is_retried_after_a_token_was_sent():
    broken = FakeBackend(script("a", "b"), error_at=1, error=BACKEND_UNAVAILABLE())
    backends = {"10.0.0.1:1": broken, "10.0.0.2:1": FakeBackend(script("x"))}
    upstreams = pool(backends)
    got = []
    with pytest.raises(APIError) as raised:
        async for chunk in upstreams.generate(REQUEST, "r"):
            got.append(chunk.text)
    assert got == ["a"] and raised.value.code == "backend_unavailable"
    assert backends["10.0.0.2:1"].requests == []


async def test_re_resolution_adds_and_retires_replicas():
    answers = [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"], ["10.0.0.2"]]
    backends = {f"10.0.0.{i}:1": FakeBackend() for i in (1, 2)}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[0]

    upstreams = pool(backends, resolve=resolve)
    await upstreams.refresh()
    assert [u.address for u in upstreams.upstreams] == ["10.0.0.1:1"]
    answers.pop(0)
    await upstreams.refresh()
    assert [u.address for u in upstreams.upstreams] == ["10.0.0.1:1", "10.0.0.2:1"]
    answers.pop(0)
    await upstreams.refresh()
    assert [u.address for u in upstreams.upstreams] == ["10.0.0.2:1"]
    assert backends["10.0.0.1:1"].closed  # idle, so closed at once


async def test_a_name_with_no_replica_is_503_with_retry_after(make_client):
    async def nothing(host: str, port: int) -> list[str]:
        return []

    upstreams = Upstreams([("none", 1)], resolve=nothing, resolve_every_s=0)
    with pytest.raises(APIError) as raised:
        await run(upstreams)
    assert (raised.value.status, raised.value.code) == (503, "backend_unavailable")
    assert raised.value.headers["Retry-After"] == "1"


# ---- two fake Tritons over real gRPC ---------------------------------------------------------


@pytest.fixture
async def two_tritons():
    tritons = [FakeTriton(free_port()), FakeTriton(free_port())]
    for triton in tritons:
        await triton.start()
    yield tritons
    for triton in tritons:
        await triton.stop()


def chat(text: str, stream: bool = True) -> dict:
    return {
        "model": SERVED_MODEL,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


# The down period of this test's proxy: the same rule, a shorter wait.
SHORT_DOWN_FOR_S = 1.0


async def test_two_replicas_share_the_load_and_survive_one_dying(two_tritons, monkeypatch):
    monkeypatch.setattr(upstreams_module, "DOWN_FOR_S", SHORT_DOWN_FOR_S)
    first, second = two_tritons
    urls = f"{first.url},{second.url}"
    async with serving(with_settings(TEST_CONFIG, triton_url=urls)) as client:

        async def one(text: str) -> tuple[int, str]:
            resp = await client.post("/v1/chat/completions", json=chat(text, stream=False))
            return resp.status, await resp.text()

        results = await asyncio.gather(*(one("tokens=3 delay=0.02") for _ in range(16)))
        assert all(status == 200 for status, _ in results)
        spread = (first.state.started, second.state.started)
        assert spread == (8, 8), spread

        # Kill the first mid-load: its streams end with an error event; requests that had
        # not started go to the second; /ready stays 200.
        streams = [
            asyncio.create_task(
                client.post("/v1/chat/completions", json=chat("tokens=40 delay=0.05"))
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.3)
        await first.stop()
        later = await asyncio.gather(*(one("tokens=2") for _ in range(6)))
        assert [status for status, _ in later] == [200] * 6
        ended = Counter()
        for task in streams:
            resp = await task
            events = sse_payloads(await resp.text())
            assert events[-1] == "[DONE]"
            ended["error" if any("error" in e for e in events[:-1] if e != "[DONE]") else "ok"] += 1
        assert ended["error"] == 2 and ended["ok"] == 2, ended
        assert (await client.get("/ready")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert (
            f'qwen_vl_proxy_upstream_requests_total{{outcome="ok",upstream="{second.url}"}}'
            in metrics
        )

        # Back on the same port: it takes traffic again without a proxy restart.
        await first.start()
        await asyncio.sleep(SHORT_DOWN_FOR_S + 0.5)  # past the down period
        before = first.state.started
        await asyncio.gather(*(one("tokens=2") for _ in range(4)))
        assert first.state.started > before
