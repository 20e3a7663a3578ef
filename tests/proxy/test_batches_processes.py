"""Batches across real proxy processes (`python -m proxy`) in front of the fake Triton
(tests/proxy/fake_triton.py), sharing one database:

- a proxy SIGKILLed mid-batch: the next one on the same SQLite file takes the dead one's lines
  over once their leases lapse; every line is in the output file once, the counts are exact;
- two replicas on one PostgreSQL share a batch of a few hundred lines: both run lines, every
  line reaches the model once and is in the output once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import openai
import pytest
from fake_triton import FakeTriton
from helpers import wait_until_async
from proxy_fakes import SERVED_MODEL
from stack import ROOT, StackConfig, free_port, proxy_command

from proxy.observability.metrics import MULTIPROCESS_DIR_ENV

# Short leases, frequent looks: a dead proxy's lines are taken over within a second or two.
FAST_LEASES = ["--batch-lease-s", "1", "--batch-poll-s", "0.1"]


class ProxyProcess:
    """`python -m proxy` as scripts/stack.py starts it, in a process group of its own."""

    def __init__(self, triton_port: int, log_path: Path, *args: str) -> None:
        self.config = StackConfig(
            model="",
            host="127.0.0.1",
            grpc_port=triton_port,
            proxy_port=free_port(),
            served_model_name=SERVED_MODEL,
            proxy_args=["--no-image-fetch", "--workers", "1", *args],
        )
        self.url = self.config.proxy_url
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in [n for n in env if n.startswith("PROXY_") or n == MULTIPROCESS_DIR_ENV]:
            del env[name]
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *proxy_command(self.config),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert self.process.returncode is None, self.log()
                try:
                    async with session.get(self.url + "/ready") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until_async(ready, timeout=60, step=0.05, what="the proxy to be ready")

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def kill(self) -> None:
        """SIGKILL: nothing of it runs after this (no drain, no lease given back)."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.process.wait()


@pytest.fixture
async def fake_triton():
    triton = FakeTriton(free_port())
    await triton.start()
    yield triton
    await triton.stop()


@pytest.fixture
async def proxies(fake_triton, tmp_path):
    """`await proxies(*args)`: a started, ready proxy; all are killed when the test ends."""
    started: list[ProxyProcess] = []

    async def start(*args: str) -> ProxyProcess:
        proxy = ProxyProcess(fake_triton.port, tmp_path / f"proxy-{len(started)}.log", *args)
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
