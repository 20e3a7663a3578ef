#!/usr/bin/env python3
"""Where the time to the first token of a first-seen image goes, stage by stage, in-process.

    .venv/bin/python bench/ttft_split.py [--preset bench] [--requests 8] [--threads 2]

For each request (a new 448x336 JPEG and a short prompt, as chat_bench sends) the stages the
engine runs are timed one after another on one thread, with the engine's own functions:

  template      chat messages -> the prompt text and the decoded, resized images
                (request.prepare._prompt_and_images: JSON, the chat template, JPEG decode,
                qwen-vl-utils' resize)
  processor     the HF processor: tokenizing, normalising and cutting the image into patches
  positions     the image digests and mrope positions (get_rope_index)
  vision        the vision tower over the image's patches (one call)

Then requests like them (other images, so the embedding cache never hits) go through a
BatchingEngine one at a time; its TTFT (submit to the first token) less the stages above is the
rest: the prompt's prefill through the text decoder, scheduling (the tower spread over steps),
sampling and the first send. No number is asserted; docs/engine.md quotes them.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "model_repository/qwen2_5_vl/1")]

import stack  # noqa: E402  (scripts/stack.py)
import torch  # noqa: E402

from bench.chat_bench import make_image  # noqa: E402
from qwen_vl_backend.engine.batching import BatchingEngine  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import load_checkpoint  # noqa: E402
from qwen_vl_backend.request import prepare as prep  # noqa: E402
from qwen_vl_backend.request.prepare import RawRequest  # noqa: E402
from qwen_vl_backend.settings import ModelSettings  # noqa: E402

STAGES = ("template", "processor", "positions", "vision")
# The engine's own timers (EngineStats.timings) over each request's life, for the rest.
ENGINE_PHASES = ("vision", "forward", "scheduling", "sampling", "output")


def raw_request(index: int, seed: int) -> RawRequest:
    jpeg = make_image(448, 336, seed + index)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image in one sentence."},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    return RawRequest(
        request_id=f"ttft-{index}",
        messages=json.dumps(messages),
        stream=True,
        sampling_parameters=json.dumps({"max_tokens": 1, "temperature": 0}),
    )


def timed_stages(raw: RawRequest, checkpoint, settings) -> dict:
    times = {}
    started = time.perf_counter()
    prompt, images, videos = prep._prompt_and_images(raw, checkpoint, settings)
    times["template"] = time.perf_counter() - started
    started = time.perf_counter()
    inputs = prep._process(checkpoint, prompt, images, videos)
    times["processor"] = time.perf_counter() - started
    started = time.perf_counter()
    items = prep._visual_items(inputs, checkpoint)
    with torch.no_grad():
        prep._positions(checkpoint.model, inputs)
    times["positions"] = time.perf_counter() - started
    visual = checkpoint.model.model.visual
    (pixels, grid) = items[0][2]
    started = time.perf_counter()
    with torch.inference_mode():
        visual(pixels.to(visual.dtype), grid_thw=grid[None])
    times["vision"] = time.perf_counter() - started
    return times


class FirstToken:
    def __init__(self):
        self.at, self.done = None, threading.Event()

    def is_cancelled(self):
        return False

    def send(self, chunk):
        self.at = self.at or time.perf_counter()
        if chunk.final:
            self.done.set()

    def fail(self, error):
        raise SystemExit(f"request failed: {error}")

    def cancelled(self):
        self.done.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", choices=("bench", "tiny", "overhead"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ModelSettings(model=stack.tiny_checkpoint(args.preset), image_cache_mb=0)
    checkpoint = load_checkpoint(settings.model, "cpu", "float32")
    engine = BatchingEngine(checkpoint, settings)
    engine_warm = FirstToken()
    engine.submit(raw_request(2000, args.seed), engine_warm)
    engine_warm.done.wait(120)
    for warm in range(2):  # first calls pay for lazy imports and oneDNN packing
        timed_stages(raw_request(1000 + warm, args.seed), checkpoint, settings)
    split = {stage: [] for stage in STAGES}
    ttft, steps = [], []
    inside = {phase: [] for phase in ENGINE_PHASES}
    for index in range(args.requests):
        for stage, seconds in timed_stages(
            raw_request(index, args.seed), checkpoint, settings
        ).items():
            split[stage].append(seconds)
        sink = FirstToken()
        before = engine.stats.timings()
        submitted = time.perf_counter()
        # a different image again, so the engine's embedding cache never hits
        engine.submit(raw_request(500 + index, args.seed), sink)
        sink.done.wait(60)
        ttft.append(sink.at - submitted)
        after = engine.stats.timings()
        for phase in ENGINE_PHASES:
            inside[phase].append(after[f"{phase}_s"] - before[f"{phase}_s"])
        steps.append(after["steps"] - before["steps"])
    engine.shutdown()
    medians = {stage: statistics.median(split[stage]) * 1000 for stage in STAGES}
    whole = statistics.median(ttft) * 1000
    medians["rest"] = whole - sum(medians.values())
    print(f"TTFT split, {args.preset} preset, 448x336 JPEG, {args.requests} requests, median ms")
    for stage, median in medians.items():
        print(f"  {stage:<10} {median:8.1f}  ({100 * median / whole:.0f} %)")
    print(f"  {'TTFT':<10} {whole:8.1f}  (submit -> first token, one request at a time)")
    print(f"inside the engine ({statistics.median(steps):.0f} steps), median ms:")
    for phase in ENGINE_PHASES:
        print(f"  {phase:<10} {statistics.median(inside[phase]) * 1000:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
