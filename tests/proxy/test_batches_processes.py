"""Batches across real proxy processes (`python -m proxy`) in front of the fake Triton
(tests/proxy/fake_triton.py), sharing one database:

- a proxy SIGKILLed mid-batch: the next one on the same SQLite file takes the dead one's lines
  over once their leases lapse; every line is in the output file once, the counts are exact;
- two replicas on one PostgreSQL share a batch of a few hundred lines: both run lines, every
  line reaches the model once and is in the output once.
"""

from __future__ import annotations

import json

import openai
import pytest
from helpers import wait_until_async
from proxy_fakes import SERVED_MODEL
from proxy_process import ProxyProcess

# Short leases, frequent looks: a dead proxy's lines are taken over within a second or two.
FAST_LEASES = ["--batch-lease-s", "1", "--batch-poll-s", "0.1"]


@pytest.fixture
async def proxies(fake_triton, tmp_path):
    """`await proxies(*args)`: a started, ready proxy; all are killed when the test ends."""
    started: list[ProxyProcess] = []

    async def start(*args: str) -> ProxyProcess:
        proxy = ProxyProcess(
            fake_triton.port, tmp_path / f"proxy-{len(started)}.log", "--workers", "1", *args
        )
        started.append(proxy)
        await proxy.start()
        await proxy.wait_ready()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.kill()


def batch_input(lines: int, script: str) -> bytes:
    """Chat lines the fake model answers by `script` (tests/proxy/fake_triton.py); each line's
    text names it, so what reached the model can be told apart."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"line-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": SERVED_MODEL,
                    "messages": [{"role": "user", "content": f"{script} n={n}"}],
                },
            }
        ).encode()
        + b"\n"
        for n in range(lines)
    )


async def start_batch(client: openai.AsyncOpenAI, content: bytes) -> str:
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def wait_for_end(client: openai.AsyncOpenAI, batch_id: str):
    async def ended():
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    return await wait_until_async(ended, timeout=60, step=0.1, what="the batch to end")


async def output_ids(client: openai.AsyncOpenAI, file_id: str) -> list[str]:
    content = await client.files.content(file_id)
    lines = [json.loads(line) for line in content.text.splitlines()]
    assert all(line["response"]["status_code"] == 200 for line in lines)
    return [line["custom_id"] for line in lines]


async def test_a_proxy_killed_mid_batch_is_resumed_by_the_next_and_no_line_is_lost_or_doubled(
    proxies, fake_triton, tmp_path
):
    lines = 40
    state = ["--state-dir", str(tmp_path / "state"), "--batch-concurrency", "4", *FAST_LEASES]
    first = await proxies(*state)
    async with first.client() as client:
        batch_id = await start_batch(client, batch_input(lines, "tokens=3 delay=0.03"))

        async def some_answered():
            batch = await client.batches.retrieve(batch_id)
            return batch if batch.request_counts.completed >= 8 else None

        before = await wait_until_async(some_answered, timeout=60, what="some answers")
    await first.kill()
    assert before.status == "in_progress" and before.request_counts.completed < lines
    started_before = fake_triton.state.started

    second = await proxies(*state)
    async with second.client() as client:
        done = await wait_for_end(client, batch_id)
        assert done.status == "completed", second.log()
        assert done.request_counts.model_dump() == {
            "total": lines,
            "completed": lines,
            "failed": 0,
        }
        assert await output_ids(client, done.output_file_id) == [f"line-{n}" for n in range(lines)]
    assert done.error_file_id is None
    # At most the lines the dead proxy had in flight ran again.
    assert fake_triton.state.started - lines <= 4 and started_before < lines


async def test_two_replicas_on_one_postgresql_share_a_batch_each_line_once(
    postgres_url, proxies, fake_triton
):
    lines = 200
    shared = ["--database-url", postgres_url, "--batch-concurrency", "4", "--batch-poll-s", "0.1"]
    first = await proxies(*shared)
    second = await proxies(*shared)
    async with first.client() as client:
        batch_id = await start_batch(client, batch_input(lines, "tokens=2 delay=0.002"))
    async with second.client() as client:
        done = await wait_for_end(client, batch_id)
        assert done.status == "completed", first.log() + second.log()
        assert done.request_counts.model_dump() == {
            "total": lines,
            "completed": lines,
            "failed": 0,
        }
        assert await output_ids(client, done.output_file_id) == [f"line-{n}" for n in range(lines)]
    state = fake_triton.state
    # Every line reached the model exactly once, from both replicas (a gRPC peer each).
    assert sorted(state.requests) == sorted(f"tokens=2 delay=0.002 n={n}" for n in range(lines))
    assert len(set(state.peers)) == 2
