#!/usr/bin/env python3
"""What serving LoRA adapters costs the engine, in-process (no Triton, no proxy), on the `bench`
preset checkpoint (built into .cache/ if missing).

Four random adapters (PEFT, rank `--rank`, every text projection; one also on the vision tower)
are made once into a temporary folder. Each round runs, in turn:

- `base`: `--concurrency` greedy streams on an engine without adapters (its own model object);
- `base+lora-engine`: the same streams, no adapter named, on the engine that serves the four
  (what adapters cost a step in which no row has one: nothing, if the base path is unchanged);
- `lora-mixed`: the same streams with the four adapters mixed evenly (one step holds them all).

Modes alternate within every round, so a load change on a shared machine hits each alike.
Reported per mode: output tokens per second over the level's wall time (median of the rounds)
and inter-token latency p50; then the ratios to `base` (the issue's target: lora-mixed ≥ 0.8x).

`--forward-only` times the text forward of one decode step alone (c rows, `--cached` tokens in
each slot; no engine, no sampling) on the adapter engine's decoder: no adapter row, every row on
one adapter, the four mixed evenly (segments, the eager form), and the four mixed as a compiled
step computes them (one masked GEMM pair over every slot), calls interleaved; the fastest call
of each is the least disturbed on a shared machine.

    python bench/lora_bench.py                      # c=8, 3 rounds
    python bench/lora_bench.py --rounds 5 --rank 8
    python bench/lora_bench.py --forward-only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_repository" / "qwen2_5_vl" / "1"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import stack  # noqa: E402
import torch  # noqa: E402
from engine_step_bench import SLOT_TOKENS, TimingSink, request, timed_calls  # noqa: E402

from qwen_vl_backend.engine.batching import BatchingEngine  # noqa: E402
from qwen_vl_backend.engine.kv_cache import SlotKVCache, StepLayout  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import load_checkpoint  # noqa: E402
from qwen_vl_backend.settings import ModelSettings  # noqa: E402

TEXT = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
VISION = r"|visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)"
ADAPTERS = ("a", "b", "c", "d")


def make_adapters(model_path: str, folder: Path, rank: int) -> dict[str, Path]:
    """Four seeded random adapters (init_lora_weights=False: B non-zero, as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    made = {}
    for seed, name in enumerate(ADAPTERS):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
        torch.manual_seed(seed)
        targets = TEXT if name != "d" else rf".*({TEXT[2:-1]}{VISION})$"
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
        )
        get_peft_model(model, config).save_pretrained(folder / name)
        made[name] = folder / name
    return made


def run_level(engine, concurrency: int, words: int, max_tokens: int, adapters):
    """`concurrency` streams at once, request i naming adapters[i % len] (None: base);
    (inter-token gaps, output tokens per second)."""
    sinks = [TimingSink() for _ in range(concurrency)]
    started = None
    for i, sink in enumerate(sinks):
        raw = request(words, max_tokens, i)
        raw.sampling_parameters = raw.sampling_parameters[:-1] + ', "ignore_eos": true}'
        raw.lora = adapters[i % len(adapters)]
        started = started or time.perf_counter()
        engine.submit(raw, sink)
    for sink in sinks:
        if not sink.done.wait(600) or sink.error:
            raise RuntimeError(f"request failed: {sink.error}")
    elapsed = max(s.times[-1] for s in sinks) - started
    gaps = [b - a for s in sinks for a, b in zip(s.times, s.times[1:])]
    return gaps, sum(s.tokens for s in sinks) / elapsed


def forward_only(engine, concurrency: int, cached: int, rounds: int) -> dict[str, list[float]]:
    """Every call's seconds of one decode step's text forward, per adapter mix."""
    decoder = engine._text_forward
    model = engine._checkpoint.model
    cache = SlotKVCache.for_model(model, concurrency, cached + 1)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(torch.arange(concurrency) + 5)
    positions = torch.full((3, concurrency), cached)
    layout = StepLayout(list(range(concurrency)), [cached + 1] * concurrency, [], "cpu")
    rows = list(range(concurrency))
    mixed = torch.arange(concurrency) * len(ADAPTERS) // concurrency  # sorted, as the engine
    mixes = {
        "base": None,
        "one adapter": torch.zeros(concurrency, dtype=torch.long),
        "four mixed": mixed,
        "four mixed, masked": mixed,
    }
    times: dict[str, list[float]] = {mix: [] for mix in mixes}
    with torch.inference_mode():
        for _ in range(rounds):
            for mix, slots in mixes.items():
                kwargs = {} if slots is None else {"lora_slots": slots}
                decoder.buckets = [concurrency] if mix.endswith("masked") else []
                call = functools.partial(decoder, embeds, positions, layout, cache, rows, **kwargs)
                times[mix].extend(timed_calls(call, 20))
    decoder.buckets = []
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="checkpoint (default: the bench preset)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--forward-only", action="store_true", help="time the text forward alone")
    parser.add_argument("--cached", type=int, default=512, help="cached tokens per row")
    args = parser.parse_args(argv)
    model = args.model or stack.tiny_checkpoint("bench")
    print(
        f"# {model}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}; c={args.concurrency}, {args.max_tokens} "
        f"tokens, rank {args.rank}, {args.rounds} rounds"
    )
    base_settings = dataclasses.replace(
        ModelSettings(),
        max_batch_size=max(16, args.concurrency),
        max_cache_tokens=max(16, args.concurrency) * SLOT_TOKENS,
    )
    with tempfile.TemporaryDirectory() as folder:
        adapters = make_adapters(model, Path(folder), args.rank)
        lora_settings = dataclasses.replace(
            base_settings,
            lora_adapters=",".join(f"{name}={path}" for name, path in adapters.items()),
            max_loras=len(adapters),
            max_lora_rank=args.rank,
        )
        lora_engine = BatchingEngine(load_checkpoint(model, "cpu", "float32"), lora_settings)
        if args.forward_only:
            times = forward_only(lora_engine, args.concurrency, args.cached, args.rounds * 5)
            lora_engine.shutdown(30)
            fastest = min(times["base"])
            for mix, seconds in times.items():
                print(
                    f"{mix:20s} forward fastest {1e3 * min(seconds):7.2f} ms  median "
                    f"{1e3 * statistics.median(seconds):7.2f} ms  x{fastest / min(seconds):.2f} "
                    "of base (fastest)"
                )
            return
        engines = {
            "base": BatchingEngine(load_checkpoint(model, "cpu", "float32"), base_settings),
            "lora": lora_engine,
        }
        modes = {
            "base": (engines["base"], [None]),
            "base+lora-engine": (engines["lora"], [None]),
            "lora-mixed": (engines["lora"], list(ADAPTERS)),
        }
        level = (args.concurrency, args.prompt_words, args.max_tokens)
        for engine, names in modes.values():  # warm-up
            run_level(engine, *level, names)
        results = {mode: ([], []) for mode in modes}
        for _ in range(args.rounds):
            for mode, (engine, names) in modes.items():
                gaps, rate = run_level(engine, *level, names)
                results[mode][0].extend(gaps)
                results[mode][1].append(rate)
        for engine in engines.values():
            engine.shutdown(30)
    base_rate = statistics.median(results["base"][1])
    for mode, (gaps, rates) in results.items():
        rate = statistics.median(rates)
        print(
            f"{mode:18s} out tok/s {rate:8.1f} (rounds: {', '.join(f'{r:.0f}' for r in rates)})"
            f"  ITL p50 {1e3 * statistics.median(gaps):6.2f} ms  x{rate / base_rate:.2f} of base"
        )


if __name__ == "__main__":
    main()
