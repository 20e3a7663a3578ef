#!/usr/bin/env python3
"""One proxy over two tritonservers (tiny checkpoint, loopback): how requests spread at c=8,
and what a replica killed mid-load costs; or (`--mode routing`) what routing by adapter and
image buys over routing by load alone.

    .venv/bin/python bench/replicas_bench.py [--requests 32] [--concurrency 8] [--out FILE]
        [--first-triton HOST:PORT]
    .venv/bin/python bench/replicas_bench.py --mode routing [--images 16] [--repeats 3]
        [--rounds 2] [--concurrency 8] [--lora NAME] [--preset tiny|bench] [--out FILE]

Phases: (1) `--requests` streamed chat completions at `--concurrency`, the spread read from
the proxy's `qwen_vl_proxy_upstream_requests_total`; (2) the same load with the second
tritonserver killed (SIGKILL) one second in: requests that had not started streaming must
not fail, streams on the killed replica end with an error event, `/ready` is polled
throughout; (3) the replica restarted: the share it takes again without a proxy restart.
`--first-triton` takes a running tritonserver (never killed) as the first replica instead of
starting one: the end-to-end test lends it the session's.

`--mode routing`: two tritonservers and two proxies over both, one `--routing affinity`, one
`--routing least-busy`. Each round sends each proxy its own seeded pool of `--images` distinct
images, each `--repeats` times in a seeded shuffled order at `--concurrency` (streamed, 8
tokens; with `--lora`, every request names that adapter); rounds alternate which proxy goes
first, so a busy machine's noise hits both. Reported per policy: each replica's media items
and cache hits (the proxy's qwen_vl_proxy_upstream_media_* counters, from the model's
`media_cache_hits`: all 0 from a model that does not report them) and its hit ratio, the
overall ratio, and TTFT p50/p99 over all its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import statistics
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
MEDIA = re.compile(
    r'qwen_vl_proxy_upstream_media_(items|cache_hits)_total\{upstream="([^"]+)"\} (\S+)'
)
POLICIES = ("affinity", "least-busy")


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


# ---- --mode routing ----------------------------------------------------------------------


def image_pool(seed: int, count: int) -> list[str]:
    """`count` distinct noise PNGs (112x112: above the model's smallest resize, so no two
    become the same pixels), as data: URLs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


async def timed_image_request(session, base: str, url: str, lora: str | None) -> float | None:
    """TTFT in seconds of one streamed request with image `url`; None when it failed."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0.0,
        "stream": True,
    }
    if lora:
        body["model"] = lora
    started = time.monotonic()
    ttft = None
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return None
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: {") and b'"content"' in line:
                ttft = time.monotonic() - started
    return ttft


async def media_counts(session, base: str) -> dict[str, dict[str, float]]:
    text = await (await session.get(f"{base}/metrics")).text()
    counts: dict[str, dict[str, float]] = {}
    for kind, upstream, value in MEDIA.findall(text):
        counts.setdefault(upstream, {})[kind] = float(value)
    return counts


async def routing_round(session, base: str, urls: list[str], seed: int, args) -> tuple[list, dict]:
    """(TTFTs, media counts by upstream) of one pool sent through one proxy."""
    order = [url for url in urls for _ in range(args.repeats)]
    random.Random(seed).shuffle(order)
    before = await media_counts(session, base)
    ttfts: list[float | None] = []

    async def worker():
        while order:
            url = order.pop()
            ttfts.append(await timed_image_request(session, base, url, args.lora))

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return ttfts, delta(await media_counts(session, base), before)


def summary(ttfts: list, media: dict) -> dict:
    done = sorted(t for t in ttfts if t is not None)
    per_replica = {
        upstream: {
            **counts,
            "hit_ratio": round(counts.get("cache_hits", 0) / counts["items"], 3)
            if counts.get("items")
            else None,
        }
        for upstream, counts in media.items()
    }
    items = sum(c.get("items", 0) for c in media.values())
    hits = sum(c.get("cache_hits", 0) for c in media.values())
    return {
        "requests": len(ttfts),
        "failed": len(ttfts) - len(done),
        "hit_ratio": round(hits / items, 3) if items else None,
        "by_replica": per_replica,
        "ttft_p50_ms": round(1000 * statistics.median(done), 1) if done else None,
        "ttft_p99_ms": round(1000 * done[min(len(done) - 1, int(0.99 * len(done)))], 1)
        if done
        else None,
    }


async def measure_routing(proxies: dict, args) -> dict:
    ttfts = {policy: [] for policy in POLICIES}
    media: dict = {policy: {} for policy in POLICIES}
    async with aiohttp.ClientSession() as session:
        for round_ in range(args.rounds):
            order = POLICIES if round_ % 2 == 0 else POLICIES[::-1]
            for index, policy in enumerate(order):
                # a pool of its own per policy and round: neither warms the other's caches
                seed = args.seed + 1000 * round_ + index
                urls = image_pool(seed, args.images)
                times, counts = await routing_round(session, proxies[policy], urls, seed, args)
                ttfts[policy] += times
                for upstream, values in counts.items():
                    mine = media[policy].setdefault(upstream, {})
                    for kind, value in values.items():
                        mine[kind] = mine.get(kind, 0) + value
    report = {policy: summary(ttfts[policy], media[policy]) for policy in POLICIES}
    affinity, least = report["affinity"]["hit_ratio"], report["least-busy"]["hit_ratio"]
    report["hit_ratio_gain"] = round(affinity / least, 2) if affinity and least else None
    report["hits_reported"] = any(c.get("cache_hits") for m in media.values() for c in m.values())
    return report


def run_routing(args) -> dict:
    model = launcher.tiny_checkpoint(args.preset)
    tritons = [launcher.Stack(launcher.loopback_config(model)) for _ in range(2)]
    replicas = [stack.config.triton_grpc_url for stack in tritons]
    proxies = {}
    for policy in POLICIES:
        config = launcher.loopback_config(model)
        config.proxy_args = ["--triton-url", ",".join(replicas), "--routing", policy]
        proxies[policy] = launcher.Stack(config)
    try:
        for stack in tritons:
            stack.start_triton()
        wait_model_ready(replicas, timeout=300)
        for stack in proxies.values():
            stack.start_proxy()
            stack.wait_ready(timeout=300)
        urls = {policy: stack.config.proxy_url for policy, stack in proxies.items()}
        report = asyncio.run(measure_routing(urls, args))
    finally:
        for stack in (*proxies.values(), *tritons):
            stack.stop()
    report["upstreams"] = replicas
    report["settings"] = {
        key: getattr(args, key)
        for key in ("images", "repeats", "rounds", "concurrency", "seed", "lora", "preset")
    }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("failover", "routing"), default="failover")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--images", type=int, default=16, help="routing: images per pool")
    parser.add_argument("--repeats", type=int, default=3, help="routing: sends per image")
    parser.add_argument("--rounds", type=int, default=2, help="routing: rounds per policy")
    parser.add_argument("--seed", type=int, default=23, help="routing: the image pools' seed")
    parser.add_argument("--lora", default=None, help="routing: the adapter every request names")
    parser.add_argument(
        "--preset",
        choices=("tiny", "bench"),
        default="tiny",
        help="routing: the checkpoint (scripts/build_tiny_checkpoint.py)",
    )
    parser.add_argument(
        "--first-triton",
        default=None,
        help="gRPC host:port of a running tritonserver to use as the first replica (it is "
        "never killed); default: start one",
    )
    args = parser.parse_args(argv)
    if args.mode == "routing":
        report = run_routing(args)
        print(json.dumps(report, indent=1))
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        return 0
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
