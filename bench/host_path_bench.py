#!/usr/bin/env python3
"""The engine's host path in-process (no Triton): step time, host share and the engine's own
timers per step, at given concurrencies.

c closed-loop clients each stream one greedy text request of --tokens tokens (the overhead and
bench presets never stop early), repeated --rounds times per level after a warm-up. The forward
is timed by wrapping `BatchingEngine._forward`, so the same numbers come out of engines that
have no timers of their own (a checkout from before them: `--root`). `--send-cost-us` and
`--cancel-cost-us` make the sink's `send` and `is_cancelled` sleep that long, the round trips
the Triton Python backend's response sender takes.

    python bench/host_path_bench.py --checkpoint .cache/overhead-qwen2.5-vl \\
        --concurrency 1 16 [--send-cost-us 200 --cancel-cost-us 130] [--root OLD_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / ".cache" / "overhead-qwen2.5-vl"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--send-cost-us", type=float, default=0.0)
    parser.add_argument("--cancel-cost-us", type=float, default=0.0)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose engine runs")
    return parser.parse_args(argv)


class Sink:
    def __init__(self, send_s: float, cancel_s: float):
        self._send_s, self._cancel_s = send_s, cancel_s
        self.done, self.times, self.error = threading.Event(), [], None

    def is_cancelled(self):
        if self._cancel_s:
            time.sleep(self._cancel_s)
        return False

    def send(self, chunk):
        if self._send_s:
            time.sleep(self._send_s)
        self.times.append(time.perf_counter())
        if chunk.final:
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.done.set()


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(args.root), str(args.root / "model_repository/qwen2_5_vl/1")]
    import torch

    from qwen_vl_backend.engine.batching import BatchingEngine
    from qwen_vl_backend.modeling.checkpoint import load_checkpoint
    from qwen_vl_backend.request.prepare import RawRequest
    from qwen_vl_backend.settings import ModelSettings

    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, "cpu", "float32")
    engine = BatchingEngine(checkpoint, ModelSettings(max_batch_size=16, max_cache_tokens=16384))
    forward = {"s": 0.0, "steps": 0}
    original = engine._forward

    def timed(step):
        started = time.perf_counter()
        result = original(step)
        forward["s"] += time.perf_counter() - started
        forward["steps"] += 1
        return result

    engine._forward = timed
    timings = getattr(engine.stats, "timings", None)

    def request(i: int):
        return RawRequest(
            request_id=str(i),
            messages=json.dumps([{"role": "user", "content": f"Tell me story number {i}."}]),
            stream=True,
            exclude_input_in_output=True,
            sampling_parameters=json.dumps({"max_tokens": args.tokens, "temperature": 0}),
        )

    def level(c: int) -> dict:
        sinks = [Sink(args.send_cost_us / 1e6, args.cancel_cost_us / 1e6) for _ in range(c)]
        seconds, steps = forward["s"], forward["steps"]
        before = timings() if timings else {}
        started = time.perf_counter()
        for i, sink in enumerate(sinks):
            engine.submit(request(i), sink)
        for sink in sinks:
            assert sink.done.wait(600) and sink.error is None, sink.error
        wall = time.perf_counter() - started
        steps = forward["steps"] - steps
        seconds = forward["s"] - seconds
        gaps = sorted(b - a for s in sinks for a, b in zip(s.times, s.times[1:]))
        result = {
            "c": c,
            "out_tok_s": round(c * args.tokens / wall, 1),
            "steps": steps,
            "step_ms": round(1e3 * wall / steps, 3),
            "forward_ms": round(1e3 * seconds / steps, 3),
            "host_share": round(1 - seconds / wall, 3),
            "response_gap_p50_ms": round(1e3 * gaps[len(gaps) // 2], 3) if gaps else None,
        }
        if timings:
            after = timings()
            result["engine_ms_per_step"] = {
                name[:-2]: round(1e3 * (after[name] - before[name]) / max(1, steps), 3)
                for name in after
                if name.endswith("_s")
            }
            result["coalesced_steps"] = after["coalesced_steps"] - before["coalesced_steps"]
        return result

    level(4)  # warm-up
    for c in args.concurrency:
        for _ in range(args.rounds):
            print(json.dumps(level(c)), flush=True)
    engine.shutdown(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
