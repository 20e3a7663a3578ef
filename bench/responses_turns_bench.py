#!/usr/bin/env python3
"""Turn-2 TTFT of a stored Responses conversation against turn 1's, on one stack.

    .venv/bin/python bench/responses_turns_bench.py [--conversations 10] [--seed 0]
        [--max-output-tokens 32] [--checkpoint DIR] [--out FILE]

A stack (tritonserver + proxy, its stored state in a fresh directory) on the `bench` preset of
scripts/build_tiny_checkpoint.py (built if missing) serves `--conversations` two-turn
conversations one after another, each with an image no request has carried before (seeded):

  turn 1   streamed `responses.create`: the image and a question
  turn 2   streamed `responses.create` with `previous_response_id` and a text question only;
           the proxy puts the stored turn (image included) before it, and the model finds the
           image's embedding in its cache and turn 1's prompt in the slot it left (prefix
           reuse), so it prefills only turn 1's answer and the new question
  full     (`--full`, another conversation each: a turn 1, then) turn 2 sent in full by the
           client with `store: false`, as a stateless client does: the same prompt as `turn 2`
           through the same caches, so the two should match

TTFT is from sending the request to the first `response.output_text.delta` event, on the
client. One untimed request warms the stack first. The report gives p50 (and min, max) of each
and the ratio turn 2 / turn 1 (issue 21's target: <= 0.5). Nothing is asserted.
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
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import build_tiny_checkpoint  # noqa: E402  (scripts/build_tiny_checkpoint.py)
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)

from bench.chat_bench import make_image  # noqa: E402

QUESTION = "Describe this image in one sentence."
FOLLOW_UP = "What is the main colour in it?"
WIDTH, HEIGHT = 448, 336  # as chat_bench and ttft_split send


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def image_turn(seed: int) -> list[dict]:
    jpeg = make_image(WIDTH, HEIGHT, seed)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": QUESTION},
                {"type": "input_image", "image_url": url},
            ],
        }
    ]


def timed(client, **request) -> tuple[float, object]:
    """(seconds to the first text delta, the final response) of one streamed request."""
    started = time.perf_counter()
    first = None
    final = None
    for event in client.responses.create(stream=True, temperature=0, **request):
        if event.type == "response.output_text.delta" and first is None:
            first = time.perf_counter() - started
        if event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = event.response
    if first is None or final is None or final.status == "failed":
        raise RuntimeError(f"no text or a failed response: {final}")
    return first, final


def summary(values: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "n": len(values),
    }


def run(client, model: str, args) -> dict:
    common = {"model": model, "max_output_tokens": args.max_output_tokens}
    timed(client, input=image_turn(args.seed + 10_000), **common)  # warm-up, not timed
    turn1, turn2, full = [], [], []
    for index in range(args.conversations):
        seed = args.seed + index
        first_s, first = timed(client, input=image_turn(seed), **common)
        second_s, second = timed(client, input=FOLLOW_UP, previous_response_id=first.id, **common)
        turn1.append(first_s)
        turn2.append(second_s)
        line = (
            f"conversation {index}: turn 1 {first_s * 1000:.0f} ms, turn 2 {second_s * 1000:.0f} ms"
        )
        line += f" (input tokens {first.usage.input_tokens} -> {second.usage.input_tokens})"
        if args.full:
            # Another new image: a fresh turn 1, then turn 2 as a stateless client sends it.
            other = image_turn(args.seed + 1000 + index)
            _, base = timed(client, input=other, **common)
            history = [
                *other,
                {
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": base.output_text}],
                },
                {"role": "user", "content": FOLLOW_UP},
            ]
            full_s, _ = timed(client, input=history, store=False, **common)
            full.append(full_s)
            line += f", turn 2 sent in full {full_s * 1000:.0f} ms"
        log(line)
    report = {"turn1": summary(turn1), "turn2_previous_response_id": summary(turn2)}
    if full:
        report["turn2_sent_in_full"] = summary(full)
    report["turn2_over_turn1_p50"] = round(statistics.median(turn2) / statistics.median(turn1), 3)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-output-tokens", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="also turn 2 sent in full")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="model directory (default: the bench preset, built if missing)",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    import openai

    checkpoint = args.checkpoint
    if checkpoint is None:
        out = build_tiny_checkpoint.PRESETS["bench"]["out"].resolve()
        if not build_tiny_checkpoint.is_current(out, "bench"):
            log(f"building the bench checkpoint in {out}")
            build_tiny_checkpoint.build(out, preset="bench")
        checkpoint = str(out)
    # A loopback stack keeps its proxy's state in a fresh directory of its own.
    config = stack_launcher.loopback_config(checkpoint, exit_timeout_s=5)
    running = stack_launcher.Stack(config)
    try:
        log("starting the stack")
        running.start()
        running.wait_ready(timeout=args.ready_timeout)
        client = openai.OpenAI(
            base_url=f"{config.proxy_url}/v1", api_key="unused", max_retries=0, timeout=600
        )
        model = client.models.list().data[0].id
        report = run(client, model, args)
    finally:
        running.stop()
    report["settings"] = {
        "checkpoint": checkpoint,
        "conversations": args.conversations,
        "seed": args.seed,
        "max_output_tokens": args.max_output_tokens,
        "image": f"{WIDTH}x{HEIGHT} JPEG, a new one per conversation",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
