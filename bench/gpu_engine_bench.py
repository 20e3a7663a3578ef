#!/usr/bin/env python3
"""Standalone engine benchmark on a GPU: a Qwen2.5-VL-7B-shaped model with random bf16 weights.

No Triton, no hub, no checkpoint download: the model is built from a config in GPU memory and
driven through the project's BatchingEngine, the same code the Triton model runs. Reports
inter-token latency at concurrency 1 and output tokens/s at each concurrency, next to the
memory-bandwidth floor (every decode step reads all decoder weights once).

    python bench/gpu_engine_bench.py                       # 7B shape, cuda, bf16
    python bench/gpu_engine_bench.py --shape small --device cpu --dtype float32   # smoke test

Needs only torch, transformers, qwen-vl-utils and tokenizers (requirements/model.txt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_repository" / "qwen2_5_vl" / "1"))
sys.path.insert(0, str(ROOT / "scripts"))

from qwen_vl_backend.engine.batching import BatchingEngine, EngineObserver  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import Checkpoint  # noqa: E402
from qwen_vl_backend.request.prepare import RawRequest  # noqa: E402
from qwen_vl_backend.settings import ModelSettings  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json, which is what the shapes below reproduce.
SHAPES = {
    "7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            mrope_section=[16, 24, 24],
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    ),
    "small": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=152064,
            mrope_section=[8, 12, 12],
        ),
        vision=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=256,
            fullatt_block_indexes=[1],
        ),
    ),
}
# Peak HBM bandwidth, bytes/s, for the floor: H100 SXM 3.35 TB/s (H200: 4.8 TB/s).
DEFAULT_BANDWIDTH = 3.35e12


def build_model(shape: str, device: str, dtype: torch.dtype, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = SHAPES[shape]
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        ),
        vision_config=dict(
            **spec["vision"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # random weights; N(0, 0.02) keeps activations finite
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def decoder_weight_bytes(model) -> int:
    """Bytes a decode step must read: the language model and the LM head (not the vision tower)."""
    parts = [model.model.language_model, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


class StepClock(EngineObserver):
    def __init__(self):
        self.step_times: list[float] = []

    def decoded(self, batch_size, waiting):
        if batch_size:
            self.step_times.append(time.perf_counter())


class CountingSink:
    def __init__(self):
        self.tokens = 0
        self.done = threading.Event()
        self.error = None

    def is_cancelled(self):
        return False

    def send(self, chunk):
        self.tokens += chunk.num_tokens
        if chunk.finish_reason:
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.done.set()


# Tokens per KV slot: the prompt (~3 tokens a word with the tiny tokenizer) and max_tokens fit.
SLOT_TOKENS = 4096


def request(prompt_words: int, max_tokens: int, index: int) -> RawRequest:
    text = " ".join(f"word{(index * 7 + i) % 50}" for i in range(prompt_words))
    return RawRequest(
        request_id=f"bench-{index}",
        stream=True,
        exclude_input_in_output=True,
        messages=json.dumps([{"role": "user", "content": text}]),
        sampling_parameters=json.dumps({"max_tokens": max_tokens, "temperature": 0}),
    )


def run_level(engine, clock, concurrency, prompt_words, max_tokens):
    sinks = [CountingSink() for _ in range(concurrency)]
    clock.step_times.clear()
    started = time.perf_counter()
    for i, sink in enumerate(sinks):
        engine.submit(request(prompt_words, max_tokens, i), sink)
    for sink in sinks:
        if not sink.done.wait(1800) or sink.error:
            raise RuntimeError(f"request failed: {sink.error}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    gaps = [b - a for a, b in zip(clock.step_times, clock.step_times[1:])]
    return sum(s.tokens for s in sinks) / elapsed, gaps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=DEFAULT_BANDWIDTH,
        help="peak memory bandwidth in bytes/s for the floor (H100 SXM: 3.35e12)",
    )
    args = parser.parse_args(argv)

    import stack
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(stack.tiny_checkpoint())  # tokenizer + template only
    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.device, dtype, processor.tokenizer)
    levels = [int(c) for c in args.concurrency.split(",")]
    # No EOS: every request generates exactly max_tokens, so the numbers compare.
    checkpoint = Checkpoint(
        model=model,
        processor=processor,
        device=args.device,
        eos_token_ids=frozenset(),
        max_model_len=32768,
        random_weights=True,
    )
    # The KV cache is preallocated (max_batch_size slots): size each slot for this workload.
    settings = ModelSettings(
        max_batch_size=max(levels),
        max_cache_tokens=max(levels) * SLOT_TOKENS,
        max_queued_requests=max(levels) * 2,
    )
    clock = StepClock()
    engine = BatchingEngine(checkpoint, settings, observer=clock)
    weight_bytes = decoder_weight_bytes(model)
    floor_ms = weight_bytes / args.bandwidth * 1000
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"device: {device_name}; shape {args.shape}; {args.dtype}; decoder weights "
        f"{weight_bytes / 1e9:.2f} GB → bandwidth floor {floor_ms:.2f} ms/token at "
        f"{args.bandwidth / 1e12:.2f} TB/s"
    )
    try:
        run_level(engine, clock, 1, args.prompt_words, 8)  # warm-up
        print("| concurrency | output tok/s | ITL p50 ms | ITL p99 ms | ITL p50 / floor |")
        print("|---|---|---|---|---|")
        for concurrency in levels:
            tokens_per_s, gaps = run_level(
                engine, clock, concurrency, args.prompt_words, args.max_tokens
            )
            gaps_ms = sorted(g * 1000 for g in gaps) or [float("nan")]
            p50 = statistics.median(gaps_ms)
            p99 = gaps_ms[min(len(gaps_ms) - 1, int(len(gaps_ms) * 0.99))]
            print(
                f"| {concurrency} | {tokens_per_s:.1f} | {p50:.2f} | {p99:.2f} | {p50 / floor_ms:.2f}× |"
            )
    finally:
        engine.shutdown(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
