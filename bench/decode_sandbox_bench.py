#!/usr/bin/env python3
"""What the decode sandbox costs: TTFT at concurrency c with media decoded in the sandbox's
worker processes against the same decode code run in the preparing thread, rounds interleaved.

    .venv/bin/python bench/decode_sandbox_bench.py [--media image|video] [--concurrency 8]
        [--rounds 6] [--preset bench] [--workers 2]

Each round submits `concurrency` requests at once to an in-process BatchingEngine (one new
448x336 JPEG each, or one new 4-s 320x240 MP4 each, so the embedding cache never hits) and
records each request's time to its first token. Rounds alternate between the two modes (the
machine's noise hits both); each mode starts with a warm-up round. It prints the median TTFT
of each mode, their difference per request and as a share of the in-process TTFT, and the
median time one item takes to decode either way, alone. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "scripts"),
    str(ROOT / "tests"),
    str(ROOT / "model_repository/qwen2_5_vl/1"),
]

import stack  # noqa: E402  (scripts/stack.py)
import torch  # noqa: E402

from bench.chat_bench import make_image  # noqa: E402
from bench.host_path_bench import Sink  # noqa: E402
from qwen_vl_backend.engine.batching import BatchingEngine  # noqa: E402
from qwen_vl_backend.errors import RequestError  # noqa: E402
from qwen_vl_backend.media import decoding, sandbox  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import load_checkpoint  # noqa: E402
from qwen_vl_backend.request.prepare import RawRequest  # noqa: E402
from qwen_vl_backend.settings import ModelSettings  # noqa: E402

SANDBOXED = decoding.run


def in_process(task, data, args, timeout_s, param, kind):
    """The sandbox's own task functions, called in this process (what decoding did before)."""
    try:
        return sandbox.TASKS[task](data, args)
    except sandbox.Refused as exc:
        raise RequestError(exc.message, param, exc.code) from None


def make_video(seed: int) -> bytes:
    from sample_videos import clip

    return clip("mp4", "libx264", seconds=4.0, fps=30, size=(320 + 2 * (seed % 8), 240))


def media_part(kind: str, seed: int) -> dict:
    if kind == "image":
        url = "data:image/jpeg;base64," + base64.b64encode(make_image(448, 336, seed)).decode()
        return {"type": "image_url", "image_url": {"url": url}}
    url = "data:video/mp4;base64," + base64.b64encode(make_video(seed)).decode()
    return {"type": "video_url", "video_url": {"url": url}}


def raw_request(kind: str, seed: int) -> RawRequest:
    content = [{"type": "text", "text": "Describe this in one sentence."}, media_part(kind, seed)]
    return RawRequest(
        request_id=f"sandbox-{seed}",
        messages=json.dumps([{"role": "user", "content": content}]),
        stream=True,
        sampling_parameters=json.dumps({"max_tokens": 1, "temperature": 0}),
    )


def one_round(engine, kind: str, seeds: range) -> list[float]:
    requests = [raw_request(kind, seed) for seed in seeds]  # encoded before the clock starts
    sinks = [Sink(send_s=0.0, cancel_s=0.0) for _ in requests]  # free sends, times each chunk
    started = time.perf_counter()
    for raw, sink in zip(requests, sinks):
        engine.submit(raw, sink)
    for sink in sinks:
        sink.done.wait(600)
        if sink.error is not None:
            raise SystemExit(f"request failed: {sink.error}")
    return [sink.times[0] - started for sink in sinks]


def decode_alone(kind: str, seeds: range) -> dict[str, float]:
    """Median ms to decode one item alone, each way."""
    limits = ModelSettings().limits()
    if kind == "image":
        task, args = "image", {"max_source_pixels": limits.max_source_pixels}
        args |= {"max_aspect_ratio": limits.max_aspect_ratio, "min_pixels": limits.min_pixels}
        args |= {"max_pixels": limits.max_pixels}
        items = [make_image(448, 336, seed) for seed in seeds]
    else:
        from qwen_vl_backend.media.videos import VideoOptions, _args

        options = VideoOptions(2.0, 64, limits.min_pixels, limits.max_pixels, 4096 * 784)
        task, args = "video", _args(limits, options, family="iso")
        items = [make_video(seed) for seed in seeds]
    times: dict[str, list[float]] = {"sandbox": [], "in-process": []}
    for data in items:
        for mode, run in (("sandbox", SANDBOXED), ("in-process", in_process)):
            started = time.perf_counter()
            run(task, data, args, 60, "x", kind)
            times[mode].append(time.perf_counter() - started)
    return {mode: statistics.median(values) * 1000 for mode, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", default="image", choices=("image", "video"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="per mode")
    parser.add_argument("--preset", default="bench", choices=("bench", "tiny", "overhead"))
    parser.add_argument("--workers", type=int, default=2, help="decode_workers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ModelSettings(
        model=stack.tiny_checkpoint(args.preset), image_cache_mb=0, decode_workers=args.workers
    )
    decoding.configure(settings).wait_ready(args.workers)
    engine = BatchingEngine(load_checkpoint(settings.model, "cpu", "float32"), settings)
    modes = {"sandbox": SANDBOXED, "in-process": in_process}
    ttft: dict[str, list[float]] = {mode: [] for mode in modes}
    seed = args.seed * 100_000
    for run in modes.values():  # warm-up: lazy imports, oneDNN packing
        decoding.run = run
        one_round(engine, args.media, range(seed, seed + args.concurrency))
        seed += args.concurrency
    for index in range(args.rounds * 2):
        order = list(modes) if index % 4 < 2 else list(reversed(modes))
        mode = order[index % 2]
        decoding.run = modes[mode]
        ttft[mode] += one_round(engine, args.media, range(seed, seed + args.concurrency))
        seed += args.concurrency
    decoding.run = SANDBOXED
    alone = decode_alone(args.media, range(seed, seed + 8))
    engine.shutdown()
    decoding.shutdown()
    medians = {mode: statistics.median(values) * 1000 for mode, values in ttft.items()}
    extra = medians["sandbox"] - medians["in-process"]
    print(
        f"decode sandbox, {args.media}, c={args.concurrency}, {args.preset} preset, "
        f"{args.rounds} rounds per mode interleaved, {args.workers} decode workers"
    )
    for mode, median in medians.items():
        print(f"  TTFT median {mode:<10} {median:8.1f} ms  (n={len(ttft[mode])})")
    print(
        f"  sandbox overhead      {extra:8.1f} ms  ({100 * extra / medians['in-process']:+.1f} %)"
    )
    for mode, median in alone.items():
        print(f"  one {args.media} alone, {mode:<10} {median:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
