#!/usr/bin/env python3
"""Chat-completions benchmark: does in-flight batching pay off? One run, one checkpoint, every mode.

    .venv/bin/python bench/chat_bench.py [--levels 1,2,4,8,16] [--requests N] [--max-tokens 128] [--out FILE]

Modes, each started and stopped by this script on loopback and free ports:
  batched     this stack (tritonserver + proxy), default engine settings (in-flight batching)
  unbatched   this stack with QWEN_VL_MAX_BATCH_SIZE=1: one request at a time, as the original
              Flask server did
  hf-serve    `transformers serve` on the same checkpoint (needs requirements/bench.txt); started
              with --continuous-batching, its best mode, which it drops for models it cannot
              batch (it logs `CB: False`; the report says which path it took)
plus an in-process baseline: HF `model.generate` in a plain Python process, timed to the first
token with a streamer, for the TTFT target.

Every mode gets the same requests (streaming chat completions, one JPEG image + a short text
prompt, temperature 0, fixed max_tokens) at each concurrency level: `c` clients in a closed loop
send a fixed number of requests. Output tokens are the usage counts the server returns, so a
request that stops early never inflates a rate. The default checkpoint is the `bench` preset of
scripts/build_tiny_checkpoint.py (random weights, ~60M text parameters, built on first use).
See docs/benchmarks.md for how to read the report.
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
sys.path.insert(0, str(ROOT / "scripts"))
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)

LOG_DIR = ROOT / ".cache" / "logs" / "bench"
DEFAULT_OUT = ROOT / ".cache" / "bench" / "chat_bench.md"
MODES = ("batched", "unbatched", "hf-serve")
MODE_TITLES = {
    "batched": "(a) this stack, in-flight batching (default engine settings)",
    "unbatched": "(b) this stack, batching off (QWEN_VL_MAX_BATCH_SIZE=1)",
    "hf-serve": "(c) transformers serve",
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
# Targets (ratios at TARGET_LEVEL, image + text requests).
TARGET_LEVEL = 8
TARGET_VS_UNBATCHED = 3.0
TARGET_VS_HF_SERVE = 2.0
TARGET_TTFT_RATIO = 1.25


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- the request set ----------------------------------------------------------------------

def make_image(width: int, height: int, seed: int) -> bytes:
    """A deterministic picture (gradient, shapes, a little noise) as JPEG bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 255 // max(width + height - 2, 1)], axis=-1)
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


@dataclass
class RequestSpec:
    prompt: str
    image: bytes | None  # JPEG

    def messages(self) -> list[dict]:
        content = []
        if self.image is not None:
            url = "data:image/jpeg;base64," + base64.b64encode(self.image).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": content}]


def request_set(count: int, width: int, height: int, images: bool, seed: int) -> list[RequestSpec]:
    """`count` requests cycling through the prompts and (as many) distinct images of one size."""
    pictures = [make_image(width, height, seed + i) for i in range(min(count, len(PROMPTS)))] if images else []
    return [RequestSpec(PROMPTS[i % len(PROMPTS)], pictures[i % len(pictures)] if images else None)
            for i in range(count)]


def request_body(spec: RequestSpec, model: str, max_tokens: int, include_usage: bool) -> bytes:
    body = {"model": model, "messages": spec.messages(), "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    if include_usage:  # the proxy sends usage only when asked; transformers serve refuses the field
        body["stream_options"] = {"include_usage": True}
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
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


async def stream_one(session, url: str, body: bytes, timeout: float) -> RequestResult:
    import aiohttp

    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
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
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result.end = time.perf_counter()
    return result


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(concurrency: int, results: list[RequestResult], wall: float, max_tokens: int) -> dict:
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    ttft = [r.first_content - r.start for r in good if r.first_content is not None]
    gaps = [b - a for r in good for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    ms = lambda value: None if value is None else round(value * 1000, 1)  # noqa: E731
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
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
    }


async def drive(base_url: str, model: str, specs: list[RequestSpec], args, include_usage: bool) -> list[dict]:
    """Warm up, then every concurrency level in turn; one summary per level."""
    import aiohttp

    url = f"{base_url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(args.warmup):
            warm = await stream_one(session, url, request_body(specs[i % len(specs)], model, args.max_tokens,
                                                               include_usage), args.request_timeout)
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        levels = []
        for concurrency in args.levels:
            count = args.requests or max(2 * concurrency, 8)
            bodies = [request_body(specs[i % len(specs)], model, args.max_tokens, include_usage)
                      for i in range(count)]
            pending = iter(bodies)
            results: list[RequestResult] = []

            async def client():
                for body in pending:  # each client takes the next request when its last is done
                    results.append(await stream_one(session, url, body, args.request_timeout))

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(min(concurrency, count))))
            summary = summarize(concurrency, results, time.perf_counter() - started, args.max_tokens)
            log(f"  c={concurrency:<3} {summary['ok']}/{summary['requests']} ok  "
                f"{summary['output_tok_s']} tok/s  TTFT p50 {summary['ttft_p50_ms']} ms  "
                f"ITL p50 {summary['itl_p50_ms']} ms")
            levels.append(summary)
        return levels


# ---- servers ------------------------------------------------------------------------------

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
        model=checkpoint, host="127.0.0.1", http_port=free(), grpc_port=free(), metrics_port=free(),
        proxy_port=free(), log_dir=LOG_DIR, extra_env=dict(extra_env))
    stack = stack_launcher.Stack(config)
    for path in (stack.triton_log, stack.proxy_log):
        path.unlink(missing_ok=True)
    try:
        stack.start()
        stack.wait_ready(ready_timeout)
        yield config.proxy_url, {"logs": [str(stack.triton_log), str(stack.proxy_log)]}
    finally:
        stack.stop()


def hf_serve_problem() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    missing = [name for name in ("fastapi", "uvicorn", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"transformers[serving] extras are not installed (missing: {', '.join(missing)}); "
                f"install them with: {sys.executable} -m pip install -r requirements/bench.txt")
    return None


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
def hf_serve(checkpoint: str, device: str, dtype: str, ready_timeout: float, threads: int = 0):
    problem = hf_serve_problem()
    if problem:
        raise RuntimeError(problem)
    port = stack_launcher.free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"transformers-serve-{port}.log"
    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        cli = Path(shutil.which("transformers") or cli)
    cmd = [str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype,
           "--continuous-batching", checkpoint]
    env = _server_env(checkpoint, threads)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    info = {"logs": [str(log_path)], "command": "transformers " + " ".join(cmd[1:])}
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{_tail(log_path)}")
            if _http_get(f"{base_url}/health")[0] == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready after {ready_timeout:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield base_url, info
    finally:
        _stop_group(proc)
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        info["continuous_batching_used"] = ("CB: True" in text) if "CB: " in text else None


def _threads_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}


def _server_env(checkpoint: str, threads: int = 0) -> dict:
    env = dict(os.environ)
    env.update(_threads_env(threads))
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if Path(checkpoint).is_dir():  # a local checkpoint never needs the hub
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# ---- the in-process baseline --------------------------------------------------------------

def inprocess_worker(spec_path: str) -> int:
    """Runs in its own process: HF generate on each request, TTFT via a streamer. JSON on stdout."""
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    spec = json.loads(Path(spec_path).read_text())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        spec["checkpoint"], dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa",
    ).to(spec["device"]).eval()
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
            content.append({"type": "image", "image": image.convert("RGB"),
                            "min_pixels": spec["min_pixels"], "max_pixels": spec["max_pixels"]})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)
        inputs = processor(text=[text], images=images or None, return_tensors="pt").to(spec["device"])
        streamer = FirstToken()
        with torch.inference_mode():
            model.generate(**inputs, streamer=streamer, max_new_tokens=spec["max_tokens"], do_sample=False)
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
    print(json.dumps({
        "requests": len(requests),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "output_tok_s": round(tokens / total, 2),
        "completion_tokens": tokens,
        "torch_threads": torch.get_num_threads(),
        "parameters_total": params,
        "parameters_vision": vision_params,
    }))
    return 0


def run_inprocess(checkpoint: str, specs: list[RequestSpec], args, device: str, dtype: str) -> dict:
    count = args.requests or 8  # as many as the c=1 level sends
    payload = {
        "checkpoint": checkpoint, "device": device, "dtype": dtype, "max_tokens": args.max_tokens,
        "min_pixels": 4 * 28 * 28, "max_pixels": 1280 * 28 * 28,  # the model's config.pbtxt defaults
        "requests": [[s.prompt, base64.b64encode(s.image).decode() if s.image else None]
                     for s in (specs[i % len(specs)] for i in range(count))],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec_file:
        json.dump(payload, spec_file)
    try:
        out = subprocess.run([sys.executable, __file__, "--inprocess-worker", spec_file.name],
                             capture_output=True, text=True, timeout=args.ready_timeout + 60 * count,
                             env=_server_env(checkpoint, args.threads), cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"in-process worker failed ({out.returncode}):\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(spec_file.name)


# ---- machine, report ----------------------------------------------------------------------

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
                mem_gib = round(int(line.split()[1]) / 1024 ** 2, 1)
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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
    return info


def _loadavg() -> str | None:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


class CpuWatch:
    """CPU time that processes other than this benchmark and its servers used meanwhile.

    /proc/stat's busy time (steal included) minus the CPU time of this process and all its
    descendants (live ones read from /proc with their reaped children, dead ones through
    os.times()). A large share means the numbers were taken on a busy machine."""

    def __init__(self):
        self.wall, self.busy, self.own = time.monotonic(), _cpu_busy_s(), _own_cpu_s()

    def done(self) -> dict | None:
        busy = _cpu_busy_s()
        if busy is None or self.busy is None:
            return None
        wall = time.monotonic() - self.wall
        others = max(0.0, (busy - self.busy) - (_own_cpu_s() - self.own))
        capacity = wall * (os.cpu_count() or 1)
        return {"wall_s": round(wall, 1), "other_cpu_s": round(others, 1),
                "other_share": round(others / capacity, 3) if capacity else None}


def _cpu_busy_s() -> float | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """This process, its reaped children, and every live descendant with its reaped children."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    me = os.getpid()
    for pid in cpu:
        ancestor, hops = parents.get(pid), 0
        while ancestor and ancestor != me and hops < 64:
            ancestor, hops = parents.get(ancestor), hops + 1
        if ancestor == me:
            total += cpu[pid]
    return total


def _busy_note(report: dict) -> str | None:
    """A warning when other processes took a noticeable share of the CPUs during a mode."""
    parts = [(name, part.get("other_cpu")) for name, part in
             [("in-process", report.get("inprocess") or {}), *report["modes"].items()]]
    busy = [f"{name} {cpu['other_share']:.0%}" for name, cpu in parts
            if cpu and cpu.get("other_share") is not None and cpu["other_share"] > 0.10]
    if not busy:
        return None
    return (f"the machine was not quiet: other processes used this share of all CPUs during "
            f"{', '.join(busy)}; rerun on a quiet machine before trusting ratios")


def _level(mode: dict, concurrency: int) -> dict | None:
    for level in mode.get("levels") or []:
        if level["concurrency"] == concurrency and level["ok"]:
            return level
    return None


def targets(report: dict) -> list[dict]:
    modes, out = report["modes"], []

    def ratio_row(name, numerator, denominator, goal, higher_is_better):
        if numerator is None or denominator is None or denominator == 0:
            return {"target": name, "ratio": None, "goal": goal, "verdict": "n/a"}
        ratio = numerator / denominator
        ok = ratio >= goal if higher_is_better else ratio <= goal
        return {"target": name, "ratio": round(ratio, 2), "goal": goal, "verdict": "PASS" if ok else "MISS"}

    def tok_s(mode_name):
        level = _level(modes.get(mode_name, {}), TARGET_LEVEL)
        return level["output_tok_s"] if level else None

    out.append(ratio_row(f"output tok/s at c={TARGET_LEVEL}: batched / unbatched ≥ {TARGET_VS_UNBATCHED:g}×",
                         tok_s("batched"), tok_s("unbatched"), TARGET_VS_UNBATCHED, True))
    out.append(ratio_row(f"output tok/s at c={TARGET_LEVEL}: batched / transformers serve ≥ {TARGET_VS_HF_SERVE:g}×",
                         tok_s("batched"), tok_s("hf-serve"), TARGET_VS_HF_SERVE, True))
    first = _level(modes.get("batched", {}), 1)
    inproc = report.get("inprocess") or {}
    out.append(ratio_row(f"TTFT p50 at c=1: batched / in-process generate ≤ {TARGET_TTFT_RATIO:g}×",
                         first["ttft_p50_ms"] if first else None, inproc.get("ttft_p50_ms"),
                         TARGET_TTFT_RATIO, False))
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = ["# chat_bench results", "",
             f"- machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
             f"{m['memory_gib']} GiB RAM; device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}",
             f"- software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
             f"servers and baseline run with OMP_NUM_THREADS={s.get('OMP_NUM_THREADS') or 'unset'} "
             f"(torch's default here: {m['torch_threads']} threads)",
             f"- load average at start: {m['loadavg_at_start']}",
             f"- checkpoint: {s['checkpoint']} ({s.get('parameters') or 'parameter count unknown'})",
             f"- workload: {s['workload']}, max_tokens {s['max_tokens']}, temperature 0, streaming; "
             f"levels {s['levels']}, requests per level {s['requests_per_level']}, warm-up {s['warmup']}",
             f"- started {s['started']}, took {report.get('elapsed_s', '?')} s", ""]
    lines += ["| mode | c | ok/sent | out tokens | wall s | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
              "| ITL p50 ms | ITL p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, mode in report["modes"].items():
        if mode.get("skipped"):
            lines.append(f"| {name} | skipped: {mode['skipped'].splitlines()[0][:160]} |" + " |" * 9)
            continue
        for lv in mode["levels"]:
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {lv['completion_tokens']} "
                f"| {_fmt(lv['wall_s'])} | {_fmt(lv['output_tok_s'])} | {_fmt(lv['requests_s'])} "
                f"| {_fmt(lv['ttft_p50_ms'])} | {_fmt(lv['ttft_p99_ms'])} | {_fmt(lv['itl_p50_ms'])} "
                f"| {_fmt(lv['itl_p99_ms'])} |")
    inproc = report.get("inprocess") or {}
    lines.append("")
    if inproc.get("skipped"):
        lines.append(f"In-process generate: skipped ({inproc['skipped'].splitlines()[0][:200]}).")
    elif inproc:
        lines.append(f"In-process `model.generate` (one request at a time, {inproc['requests']} requests, "
                     f"{inproc['torch_threads']} torch threads): TTFT p50 {_fmt(inproc['ttft_p50_ms'])} ms, "
                     f"p99 {_fmt(inproc['ttft_p99_ms'])} ms, {_fmt(inproc['output_tok_s'])} output tok/s"
                     f"{_other_cpu(inproc)}.")
    lines += ["", "Modes:"]
    for name, mode in report["modes"].items():
        note = mode.get("note", "")
        lines.append(f"- `{name}`: {mode.get('title', '')}{'; ' + note if note else ''}{_other_cpu(mode)}")
    lines += ["", "| target | ratio | verdict |", "|---|---:|---|"]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {_fmt(row['ratio'])} | {row['verdict']} |")
    warnings = report.get("warnings") or []
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def _other_cpu(part: dict) -> str:
    cpu = part.get("other_cpu") or {}
    share = cpu.get("other_share")
    return "" if share is None else f" (other processes used {share:.0%} of the CPUs meanwhile)"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = (out.with_suffix(".md"), out) if out.suffix == ".json" else (out, out.with_suffix(".json"))
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return md_path, json_path


# ---- main ---------------------------------------------------------------------------------

def bench_checkpoint() -> str:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_checkpoint.py"), "--preset", "bench"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See docs/benchmarks.md.")
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    parser.add_argument("--checkpoint", help="model directory or HF id (default: the bench preset of "
                                             "scripts/build_tiny_checkpoint.py, built if missing)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    parser.add_argument("--levels", type=ints, default=[1, 2, 4, 8, 16], help="concurrency levels (default 1,2,4,8,16)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: max(2*c, 8))")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="max_tokens of every request (default 128; shorter completions make the "
                             "per-request prefill a bigger share, which batching does not speed up)")
    parser.add_argument("--image-size", default="448x336", help="WIDTHxHEIGHT of the JPEG (default 448x336)")
    parser.add_argument("--text-only", action="store_true", help="send no image (text prompts only)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests per mode (default 1)")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process generate baseline")
    parser.add_argument("--device", default="auto", help="auto (cuda:0 if torch sees a GPU, else cpu), cpu, cuda:N; "
                        "for transformers serve and the in-process baseline (the stack picks its own)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for every server and the in-process baseline (default: unset, "
                             "torch's default of one thread per core)")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds a server may take to start")
    parser.add_argument("--request-timeout", type=float, default=300,
                        help="seconds one request may take, queueing included (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report file: FILE.md and FILE.json are both written (default {DEFAULT_OUT.relative_to(ROOT)})")
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
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inprocess_worker:
        return inprocess_worker(args.inprocess_worker)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()

    import torch

    device = ("cuda:0" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = "bfloat16" if device.startswith("cuda") else "float32"  # as the stack's dtype=auto
    checkpoint = args.checkpoint or bench_checkpoint()
    log(f"checkpoint {checkpoint}")
    max_level = max(args.levels)
    specs = request_set(max(max(2 * max_level, 8), args.requests, len(PROMPTS)), args.width, args.height,
                        not args.text_only, args.seed)
    report = {
        "machine": machine_info(device),
        "settings": {
            "checkpoint": checkpoint, "levels": args.levels,
            "requests_per_level": args.requests or "max(2*c, 8)", "max_tokens": args.max_tokens,
            "workload": "text only" if args.text_only else f"one {args.width}x{args.height} JPEG + a short text prompt",
            "warmup": args.warmup, "device": device, "dtype": dtype,
            "OMP_NUM_THREADS": str(args.threads) if args.threads > 0 else os.environ.get("OMP_NUM_THREADS"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "modes": {},
        "inprocess": None,
        "warnings": [],
    }
    try:
        if not args.no_inprocess:
            log("in-process generate baseline")
            watch = CpuWatch()
            try:
                report["inprocess"] = run_inprocess(checkpoint, specs, args, device, dtype)
                report["inprocess"]["other_cpu"] = watch.done()
                p = report["inprocess"]
                report["settings"]["parameters"] = (f"{p['parameters_total'] / 1e6:.1f}M parameters, "
                                                    f"{(p['parameters_total'] - p['parameters_vision']) / 1e6:.1f}M "
                                                    f"outside the vision tower")
                log(f"  TTFT p50 {p['ttft_p50_ms']} ms, {p['output_tok_s']} tok/s")
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                report["inprocess"] = {"skipped": str(exc)}
                log(f"  in-process baseline failed: {exc}")
        for name in args.modes:
            report["modes"][name] = run_mode(name, checkpoint, specs, args, device, dtype)
    except KeyboardInterrupt:
        log("interrupted; servers stopped, no report written")
        return 130
    for name, mode in report["modes"].items():
        for level in mode.get("levels") or []:
            if level["short_completions"]:
                report["warnings"].append(f"{name} c={level['concurrency']}: {level['short_completions']} "
                                          f"completions ended before max_tokens (rates use the real counts)")
            if not level["usage_reported"]:
                report["warnings"].append(f"{name} c={level['concurrency']}: no usage counts; content chunks counted")
            if level["errors"]:
                report["warnings"].append(f"{name} c={level['concurrency']}: errors: {level['errors']}")
    busy = _busy_note(report)
    if busy:
        report["warnings"].append(busy)
    report["targets"] = targets(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["machine"]["loadavg_at_end"] = _loadavg()
    text = markdown(report)
    print(text)
    md_path, json_path = write_report(report, args.out)
    log(f"wrote {md_path} and {json_path}")
    return 0


def run_mode(name: str, checkpoint: str, specs, args, device: str, dtype: str) -> dict:
    """Start the mode's server, drive every level, stop it; a failure becomes `skipped`."""
    mode = {"title": MODE_TITLES[name], "loadavg_at_start": _loadavg()}
    log(f"mode {name}: {MODE_TITLES[name]}")
    if name == "hf-serve":
        server = hf_serve(checkpoint, device, dtype, args.ready_timeout, args.threads)
        include_usage = False
    else:
        extra_env = _threads_env(args.threads)
        if name == "unbatched":
            extra_env["QWEN_VL_MAX_BATCH_SIZE"] = "1"
        server = triton_stack(checkpoint, extra_env, args.ready_timeout)
        include_usage = True
    info = {}
    try:
        with server as (base_url, info):
            model = served_model_id(base_url, checkpoint)
            watch = CpuWatch()  # while the server is up: its own CPU time is subtracted exactly
            mode["levels"] = asyncio.run(drive(base_url, model, specs, args, include_usage))
            mode["other_cpu"] = watch.done()
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        mode["skipped"] = str(exc) or type(exc).__name__
        log(f"  skipped: {mode['skipped']}")
    mode["loadavg_at_end"] = _loadavg()
    mode.update({k: v for k, v in info.items() if v is not None})
    if name == "hf-serve":
        used = info.get("continuous_batching_used")
        mode["note"] = ("started with --continuous-batching; "
                        + {True: "requests ran through continuous batching",
                           False: "it fell back to sequential generate (one request at a time) for this "
                                  "model: its CB path takes text-only LLMs",
                           None: "the log does not say which path ran"}[used])
    return mode


if __name__ == "__main__":
    sys.exit(main())
