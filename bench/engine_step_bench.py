#!/usr/bin/env python3
"""Per-token cost of the engine's text forwards, in-process (no Triton, no proxy).

Runs the BatchingEngine on the `bench` preset checkpoint (built into .cache/ if missing) with
each forward variant on its own copy of the weights, and interleaves them: every round runs each
concurrency level with each variant in turn, so a load change on a shared machine hits all of
them alike. Each level is `c` streaming greedy requests of `--max-tokens` tokens started
together (distinct text prompts of `--prompt-words` words). Reported per variant and level:
inter-token latency (gaps between a request's streamed tokens, all rounds pooled) p50/p90 and
output tokens per second over the level's wall time (median of the rounds).

    python bench/engine_step_bench.py                          # hf vs lean, c=1 and c=8
    python bench/engine_step_bench.py --variants lean lean-dense lean-compiled --rounds 2
    python bench/engine_step_bench.py --forward-only --variants hf lean lean-dense lean-compiled
    python bench/engine_step_bench.py --attention

`--forward-only` times the text forward of one decode step alone (c rows, each with `--cached`
tokens in its slot; no engine, no sampling), every call, and reports the fastest and the median
call: on a shared machine the fastest is the least disturbed. `--attention` times the decode
attention kernels the engine chose between (`kv_cache.attend` and the alternatives) the same way.

Variants: `hf` (transformers' module stack, `forward: hf`), `lean` (the engine's decoder with
the CPU default, oneDNN-packed weights), `lean-dense` (the same with `cpu_packed_linear` off),
`lean-compiled` (`compile: on`, dense weights, buckets `--compile-buckets`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_repository" / "qwen2_5_vl" / "1"))
sys.path.insert(0, str(ROOT / "scripts"))

import stack  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qwen_vl_backend.engine.batching import BatchingEngine  # noqa: E402
from qwen_vl_backend.engine.kv_cache import SlotKVCache, StepLayout, attend  # noqa: E402
from qwen_vl_backend.engine.text_forward import text_forward  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import load_checkpoint  # noqa: E402
from qwen_vl_backend.request.prepare import RawRequest  # noqa: E402
from qwen_vl_backend.settings import ModelSettings  # noqa: E402

VARIANTS = {
    "hf": dict(forward="hf"),
    "lean": dict(forward="lean", compile="off"),
    "lean-dense": dict(forward="lean", compile="off", cpu_packed_linear=False),
    "lean-compiled": dict(forward="lean", compile="on"),
}
# Tokens per KV slot: room for the prompt and the completion, and a KV cache of 128 MiB per
# variant (16 slots) instead of the default 1 GiB.
SLOT_TOKENS = 1024


class TimingSink:
    """Arrival time of every streamed chunk (the bench checkpoint streams one token a chunk)."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens = 0
        self.done = threading.Event()
        self.error = None

    def is_cancelled(self):
        return False

    def send(self, chunk):
        self.times.append(time.perf_counter())
        self.tokens += chunk.num_tokens
        if chunk.final:
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.done.set()


def request(words: int, max_tokens: int, index: int) -> RawRequest:
    text = " ".join(f"w{(index * 31 + i * 7) % 97}" for i in range(words))
    return RawRequest(
        request_id=f"step-bench-{index}",
        stream=True,
        exclude_input_in_output=True,
        messages=json.dumps([{"role": "user", "content": text}]),
        sampling_parameters=json.dumps({"max_tokens": max_tokens, "temperature": 0}),
    )


def run_level(engine, concurrency: int, words: int, max_tokens: int, first: int):
    """`concurrency` requests at once; (inter-token gaps, output tokens per second)."""
    sinks = [TimingSink() for _ in range(concurrency)]
    started = time.perf_counter()
    for i, sink in enumerate(sinks):
        engine.submit(request(words, max_tokens, first + i), sink)
    for sink in sinks:
        if not sink.done.wait(600) or sink.error:
            raise RuntimeError(f"request failed: {sink.error}")
    elapsed = max(s.times[-1] for s in sinks) - started
    gaps = [b - a for s in sinks for a, b in zip(s.times, s.times[1:])]
    return gaps, sum(s.tokens for s in sinks) / elapsed


def build_engine(model: str, variant: str, buckets: str, max_batch: int) -> BatchingEngine:
    settings = ModelSettings(
        max_batch_size=max(16, max_batch),
        max_cache_tokens=max(16, max_batch) * SLOT_TOKENS,
        compile_buckets=buckets,
        **VARIANTS[variant],
    )
    started = time.perf_counter()
    engine = BatchingEngine(load_checkpoint(model, "cpu", "float32"), settings)
    print(f"# {variant}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
    return engine


def timed_calls(function, calls: int) -> list[float]:
    for _ in range(3):
        function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def forward_only(args, model: str) -> dict:
    """One decode step's text forward per variant and concurrency; every call's seconds."""
    steps = {}
    for variant in args.variants:
        checkpoint = load_checkpoint(model, "cpu", "float32")
        settings = ModelSettings(compile_buckets=args.compile_buckets, **VARIANTS[variant])
        forward = text_forward(checkpoint.model, "cpu", settings, max(args.concurrency))
        cache = SlotKVCache.for_model(checkpoint.model, max(args.concurrency), args.cached + 1)
        embed = checkpoint.model.get_input_embeddings()
        for c in args.concurrency:
            with torch.inference_mode():  # as the engine's step: inference tensors throughout
                embeds = embed(torch.arange(c) + 5)
            positions = torch.full((3, c), args.cached)
            layout = StepLayout(list(range(c)), [args.cached + 1] * c, [], "cpu")
            steps[variant, c] = (forward, embeds, positions, layout, cache)
    times: dict = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for c in args.concurrency:
                for variant in args.variants:
                    forward, embeds, positions, layout, cache = steps[variant, c]
                    call = functools.partial(forward, embeds, positions, layout, cache, [*range(c)])
                    times.setdefault((variant, c), []).extend(timed_calls(call, 20))
    return times


def attention_kernels(args) -> dict:
    """The bench preset's attention shapes (12 query heads, 2 KV heads, head_dim 64): the
    decode kernel before the lean forward (per-head queries, enable_gqa, a masked view) and the
    candidates, for c rows of `--cached` tokens each."""
    heads, kv_heads, dim = 12, 2, 64
    keys = torch.randn(16, kv_heads, 1024, dim)
    values = torch.randn_like(keys)
    scale, n = dim**-0.5, args.cached

    def kernels(c):
        query = torch.randn(c, heads, dim)
        mask = torch.ones(c, 1, 1, n, dtype=torch.bool)
        grouped = query.view(c, kv_heads, heads // kv_heads, dim)
        k, v = keys[:c, :, :n], values[:c, :, :n]
        layout = StepLayout(list(range(c)), [n] * c, [], "cpu")
        return {
            "per-head, masked (before)": lambda: F.scaled_dot_product_attention(
                query[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True
            ),
            "grouped, masked": lambda: F.scaled_dot_product_attention(
                grouped, k, v, attn_mask=mask, scale=scale
            ),
            "grouped, no mask (attend)": lambda: attend(layout, query, keys, values, scale),
            "per slot, grouped": lambda: [
                F.scaled_dot_product_attention(
                    grouped[i : i + 1], k[i : i + 1], v[i : i + 1], scale=scale
                )
                for i in range(c)
            ],
        }

    times: dict = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, kernel in kernels(c).items():
                    times.setdefault((name, c), []).extend(timed_calls(kernel, 50))
    return times


def print_calls(times: dict, unit: float, label: str) -> None:
    print(f"| {label} | c | fastest call | median call |")
    print("|---|---:|---:|---:|")
    for (name, c), calls in sorted(times.items(), key=lambda kv: kv[0][1]):
        print(f"| {name} | {c} | {min(calls) * unit:.2f} | {statistics.median(calls) * unit:.2f} |")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bench preset)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["hf", "lean"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile-buckets", default="1,2,4,8,16", help="compile_buckets for lean-compiled"
    )
    parser.add_argument("--forward-only", action="store_true", help="time the text forward alone")
    parser.add_argument("--attention", action="store_true", help="time decode attention kernels")
    parser.add_argument("--cached", type=int, default=512, help="cached tokens per row (both)")
    args = parser.parse_args(argv)
    model = args.model or stack.tiny_checkpoint("bench")
    print(
        f"# {model}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if args.attention:
        print_calls(
            attention_kernels(args), 1e6, f"decode attention, one layer, µs ({args.cached} cached)"
        )
        return 0
    if args.forward_only:
        print_calls(
            forward_only(args, model),
            1e3,
            f"text forward, one decode step, ms ({args.cached} cached)",
        )
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
        return 0
    engines = {
        v: build_engine(model, v, args.compile_buckets, max(args.concurrency))
        for v in args.variants
    }
    results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    try:
        for engine in engines.values():  # warm-up: first-call allocations, lazy inits
            run_level(engine, 2, args.prompt_words, 8, 10_000)
        for round_ in range(args.rounds):
            for c in args.concurrency:
                for variant, engine in engines.items():
                    gaps, rate = run_level(
                        engine, c, args.prompt_words, args.max_tokens, 100 * round_
                    )
                    pooled = results.setdefault((variant, c), ([], []))
                    pooled[0].extend(gaps)
                    pooled[1].append(rate)
    finally:
        for engine in engines.values():
            engine.shutdown(30)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    print("| forward | c | ITL p50 | ITL p90 | out tok/s (median of rounds) |")
    print("|---|---:|---:|---:|---:|")
    for (variant, c), (gaps, rates) in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            f"| {variant} | {c} | {1000 * statistics.median(gaps):.1f} ms "
            f"| {1000 * percentile(gaps, 0.9):.1f} ms | {statistics.median(rates):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
