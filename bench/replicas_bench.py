#!/usr/bin/env python3
"""One proxy over two tritonservers (tiny checkpoint, loopback): how requests spread at c=8,
and what a replica killed mid-load costs.

    .venv/bin/python bench/replicas_bench.py [--requests 32] [--concurrency 8] [--out FILE]
        [--first-triton HOST:PORT]

Phases: (1) `--requests` streamed chat completions at `--concurrency`, the spread read from
the proxy's `qwen_vl_proxy_upstream_requests_total`; (2) the same load with the second
tritonserver killed (SIGKILL) one second in: requests that had not started streaming must
not fail, streams on the killed replica end with an error event, `/ready` is polled
throughout; (3) the replica restarted: the share it takes again without a proxy restart.
`--first-triton` takes a running tritonserver (never killed) as the first replica instead of
starting one: the end-to-end test lends it the session's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import stack as launcher  # noqa: E402  (scripts/stack.py)
import tritonclient.grpc as grpcclient  # noqa: E402

from client.sse import stream_events  # noqa: E402

UPSTREAM = re.compile(
    r'qwen_vl_proxy_upstream_requests_total\{outcome="(\w+)",upstream="([^"]+)"\} (\S+)'
)


async def one(session, url: str, max_tokens: int) -> str:
    """ok | failed (no stream) | broken (an error event after streaming began)."""
    body = {
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,  # sampled: the random-weight model rarely hits EOS early
        "seed": 1,
        "stream": True,
    }
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            return "failed"
        lines = [line async for line in resp.content]
    return "broken" if any("error" in e for e in stream_events(lines)) else "ok"


async def load(session, base: str, count: int, concurrency: int, max_tokens: int) -> Counter:
    remaining = [count]
    outcomes: Counter = Counter()

    async def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            outcomes[await one(session, f"{base}/v1/chat/completions", max_tokens)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def upstream_counts(session, base: str) -> dict[str, dict[str, float]]:
    text = await (await session.get(f"{base}/metrics")).text()
    counts: dict[str, dict[str, float]] = {}
    for outcome, upstream, value in UPSTREAM.findall(text):
        counts.setdefault(upstream, {})[outcome] = float(value)
    return counts


def delta(after: dict, before: dict) -> dict:
    return {
        upstream: {k: v - before.get(upstream, {}).get(k, 0.0) for k, v in outcomes.items()}
        for upstream, outcomes in after.items()
    }


async def until_it_serves(session, base: str, upstream: str, timeout: float = 120.0) -> None:
    """Until a request through the proxy is answered by `upstream`. A replica that was down
    or still loading serves again only after the proxy's gRPC channel to it has reconnected
    (with backoff) and after its down period (a failed try starts a new one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = (await upstream_counts(session, base)).get(upstream, {}).get("ok", 0.0)
        await one(session, f"{base}/v1/chat/completions", 1)
        if (await upstream_counts(session, base)).get(upstream, {}).get("ok", 0.0) > before:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the proxy sends nothing to {upstream}")


async def measure(primary, second, replicas: list[str], args) -> dict:
    base = primary.config.proxy_url
    report: dict = {}
    async with aiohttp.ClientSession() as session:
        for upstream in replicas:
            await until_it_serves(session, base, upstream)
        before = await upstream_counts(session, base)
        report["spread"] = dict(await load(session, base, args.requests, args.concurrency, 16))
        report["spread_by_upstream"] = delta(await upstream_counts(session, base), before)

        before = await upstream_counts(session, base)
        ready_codes: Counter = Counter()
        stop = asyncio.Event()

        async def poll_ready():
            while not stop.is_set():
                async with session.get(f"{base}/ready") as resp:
                    ready_codes[resp.status] += 1
                await asyncio.sleep(0.1)

        async def kill_later():
            await asyncio.sleep(1.0)
            os.killpg(second.triton.pid, signal.SIGKILL)

        poller = asyncio.create_task(poll_ready())
        started = time.monotonic()
        outcomes, _ = await asyncio.gather(
            load(session, base, args.requests, args.concurrency, 512), kill_later()
        )
        stop.set()
        await poller
        report["failover"] = dict(outcomes)
        report["failover_s"] = round(time.monotonic() - started, 2)
        report["failover_by_upstream"] = delta(await upstream_counts(session, base), before)
        report["ready_during_failover"] = dict(ready_codes)

        second.start_triton()
        await asyncio.to_thread(wait_model_ready, [second.config.triton_grpc_url], 240)
        await until_it_serves(session, base, second.config.triton_grpc_url)
        before = await upstream_counts(session, base)
        report["after_restart"] = dict(
            await load(session, base, args.requests, args.concurrency, 16)
        )
        report["after_restart_by_upstream"] = delta(await upstream_counts(session, base), before)
    return report


def wait_model_ready(grpc_urls: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for url in grpc_urls:
        client = grpcclient.InferenceServerClient(url)
        try:
            while not _model_ready(client):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the tritonserver at {url} is not ready")
                time.sleep(0.5)
        finally:
            client.close()


def _model_ready(client) -> bool:
    try:
        return client.is_model_ready(launcher.TRITON_MODEL)
    except Exception:  # not listening yet
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--first-triton",
        default=None,
        help="gRPC host:port of a running tritonserver to use as the first replica (it is "
        "never killed); default: start one",
    )
    args = parser.parse_args(argv)
    model = launcher.tiny_checkpoint()
    second = launcher.Stack(launcher.loopback_config(model))
    primary_config = launcher.loopback_config(model)
    replicas = [args.first_triton or primary_config.triton_grpc_url, second.config.triton_grpc_url]
    primary_config.proxy_args = ["--triton-url", ",".join(replicas)]
    primary = launcher.Stack(primary_config)
    try:
        second.start_triton()
        if not args.first_triton:
            primary.start_triton()
        # The proxy starts once both are ready: one it tried while loading would sit out a
        # reconnect backoff and a down period before taking requests.
        wait_model_ready(replicas, timeout=300)
        primary.start_proxy()
        primary.wait_ready(timeout=300)
        report = asyncio.run(measure(primary, second, replicas, args))
    finally:
        primary.stop()
        second.stop()
    report["upstreams"] = dict(zip(("first", "second"), replicas))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
