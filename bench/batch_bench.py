#!/usr/bin/env python3
"""Batch API benchmark: a batch through the whole stack, and what a running batch does to
interactive requests.

    .venv/bin/python bench/batch_bench.py [--part completion|interference|both]
        [--lines 1000] [--rate 0.8] [--requests 40] [--rounds 2] [--out FILE]

Two parts, each on a stack of its own (tritonserver + proxy on loopback and free ports, the
proxy's state in a fresh SQLite directory):

  completion    the tiny checkpoint: a `--lines`-line batch (chat lines, every fourth with a
                new image) uploaded with files.create and run with batches.create; reports the
                wall time from create to `completed`, the counts, and checks the output file
                (every custom_id once, in input order, all 200).
  interference  the bench preset: interactive streaming requests as an open loop (Poisson
                arrivals at `--rate`, bench/chat_bench.py's machinery: a new image per
                request, max_tokens drawn from --max-tokens-range), measured alone and with a
                batch running the whole time (lines like the interactive ones, the batch big
                enough to outlast the measurement, cancelled after it), the two alternated for
                `--rounds`. Reports TTFT and TPOT p50/p99 of each and the ratio of the TTFT
                p50s (target: with a batch <= 1.2x without), and how many batch lines finished
                meanwhile (the batch did run).

The report is FILE.md and FILE.json (default .cache/bench/batch_bench.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_bench  # noqa: E402  (bench/chat_bench.py: images, open loop, percentiles)
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)

DEFAULT_OUT = ROOT / ".cache" / "bench" / "batch_bench"
LOG_DIR = ROOT / ".cache" / "logs" / "bench"
TTFT_TARGET = 1.2  # TTFT p50 with a batch running, over without
IMAGE_EVERY = 4  # completion part: every fourth line carries an image
COMPLETION_MAX_TOKENS = 16
POLL_S = 0.5


def log(message: str) -> None:
    print(f"[batch-bench] {message}", file=sys.stderr, flush=True)


def chat_body(model: str, spec: chat_bench.RequestSpec, max_tokens: int) -> dict:
    return {"model": model, "messages": spec.messages(), "max_tokens": max_tokens, "temperature": 0}


def batch_lines(model: str, specs: list, max_tokens: list[int]) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"line-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_body(model, spec, tokens),
            }
        ).encode()
        + b"\n"
        for n, (spec, tokens) in enumerate(zip(specs, max_tokens))
    )


class Stack:
    """A tiny- or bench-preset stack with its own state directory, as a context manager."""

    def __init__(self, checkpoint: str, args) -> None:
        # loopback_config gives the proxy a fresh state directory, removed at exit.
        config = stack_launcher.loopback_config(
            checkpoint, log_dir=LOG_DIR, proxy_args=args.proxy_args
        )
        self.stack = stack_launcher.Stack(config)
        self.url = config.proxy_url
        self.ready_timeout = args.ready_timeout

    def __enter__(self) -> Stack:
        started = time.monotonic()
        self.stack.start()
        self.stack.wait_ready(self.ready_timeout)
        log(f"stack ready in {time.monotonic() - started:.0f} s at {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self.stack.stop()

    def client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=2)


async def create_batch(client, content: bytes) -> str:
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def wait_status(client, batch_id: str, statuses: tuple[str, ...], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout:g} s")
        await asyncio.sleep(POLL_S)


# ---- completion: a batch on the tiny checkpoint ------------------------------------------


async def completion(url_stack: Stack, model: str, args) -> dict:
    images = chat_bench.ImageSource(args.width, args.height, args.seed, repeat=False)
    specs = [
        chat_bench.RequestSpec(
            chat_bench.PROMPTS[n % len(chat_bench.PROMPTS)],
            images.fresh() if n % IMAGE_EVERY == 0 else None,
        )
        for n in range(args.lines)
    ]
    content = batch_lines(model, specs, [COMPLETION_MAX_TOKENS] * args.lines)
    async with url_stack.client() as client:
        started = time.monotonic()
        batch_id = await create_batch(client, content)
        created = time.monotonic()
        done = await wait_status(
            client, batch_id, ("completed", "failed", "cancelled", "expired"), args.timeout
        )
        wall = time.monotonic() - created
        output = (await client.files.content(done.output_file_id)).text.splitlines()
    lines = [json.loads(line) for line in output]
    ids = [line["custom_id"] for line in lines]
    counts = done.request_counts.model_dump()
    exact = (
        done.status == "completed"
        and counts == {"total": args.lines, "completed": args.lines, "failed": 0}
        and ids == [f"line-{n}" for n in range(args.lines)]
        and all(line["response"]["status_code"] == 200 for line in lines)
    )
    return {
        "lines": args.lines,
        "image_lines": len(range(0, args.lines, IMAGE_EVERY)),
        "max_tokens": COMPLETION_MAX_TOKENS,
        "status": done.status,
        "request_counts": counts,
        "output_lines": len(lines),
        "output_exact": exact,
        "upload_and_create_s": round(created - started, 2),
        "wall_s": round(wall, 1),
        "lines_per_s": round(args.lines / wall, 1),
        "output_tokens": done.usage.output_tokens if done.usage else None,
    }


# ---- interference: interactive TTFT with and without a batch -----------------------------


async def open_loop_round(session, url_stack: Stack, model: str, args, images, seed: int):
    """One open-loop measurement: `--requests` streamed chat requests at `--rate`."""
    rng = random.Random(seed)
    arrivals = chat_bench.poisson_arrivals(args.requests, args.rate, rng)
    low, high = args.max_tokens_range
    lengths = [rng.randint(low, high) for _ in range(args.requests)]
    specs = chat_bench.request_specs(args.requests, images)
    dialect = chat_bench.Dialect(include_usage=True, ignore_eos=False)
    bodies = [chat_bench.request_body(s, model, n, dialect) for s, n in zip(specs, lengths)]
    url = url_stack.url + "/v1/chat/completions"
    results, wall, lag = await chat_bench.open_loop(
        session, url, bodies, arrivals, args.request_timeout
    )
    return chat_bench.OpenRound(results, wall, lag, lengths)


async def interference(url_stack: Stack, model: str, args) -> dict:
    import aiohttp

    images = chat_bench.ImageSource(args.width, args.height, args.seed, repeat=False)
    low, high = args.max_tokens_range
    rng = random.Random(args.seed + 7)
    measured: dict[str, list] = {"alone": [], "with_batch": []}
    batch_progress = []
    async with url_stack.client() as client, aiohttp.ClientSession() as session:
        warm = chat_bench.request_specs(2, images)
        dialect = chat_bench.Dialect(include_usage=True, ignore_eos=False)
        for spec in warm:
            await chat_bench.stream_one(
                session,
                url_stack.url + "/v1/chat/completions",
                chat_bench.request_body(spec, model, 16, dialect),
                args.request_timeout,
            )
        for round_index in range(args.rounds):
            order = ["alone", "with_batch"] if round_index % 2 == 0 else ["with_batch", "alone"]
            for phase in order:
                seed = args.seed * 1000 + round_index
                if phase == "alone":
                    log(f"round {round_index + 1}: {args.requests} requests at {args.rate}/s alone")
                    measured["alone"].append(
                        await open_loop_round(session, url_stack, model, args, images, seed)
                    )
                    continue
                specs = chat_bench.request_specs(args.batch_lines, images)
                lengths = [rng.randint(low, high) for _ in range(args.batch_lines)]
                batch_id = await create_batch(client, batch_lines(model, specs, lengths))
                await wait_status(client, batch_id, ("in_progress",), args.timeout)
                log(
                    f"round {round_index + 1}: {args.requests} requests at {args.rate}/s with "
                    f"batch {batch_id} running"
                )
                before = await client.batches.retrieve(batch_id)
                measured["with_batch"].append(
                    await open_loop_round(session, url_stack, model, args, images, seed)
                )
                after = await client.batches.retrieve(batch_id)
                await client.batches.cancel(batch_id)
                ended = await wait_status(client, batch_id, ("cancelled",), args.timeout)
                batch_progress.append(
                    {
                        "lines": args.batch_lines,
                        "answered_during": after.request_counts.completed
                        - before.request_counts.completed,
                        "still_running_at_end": after.status == "in_progress",
                        "completed_when_cancelled": ended.request_counts.completed,
                    }
                )
    summary = {
        phase: chat_bench.summarize_rate(args.rate, rounds) for phase, rounds in measured.items()
    }
    alone, loaded = summary["alone"]["ttft_p50_ms"], summary["with_batch"]["ttft_p50_ms"]
    ratio = round(loaded / alone, 2) if alone and loaded else None
    return {
        "rate": args.rate,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "max_tokens_range": f"{low}:{high}",
        "alone": summary["alone"],
        "with_batch": summary["with_batch"],
        "batch": batch_progress,
        "ttft_p50_ratio": ratio,
        "target": f"<= {TTFT_TARGET}",
        "met": ratio is not None and ratio <= TTFT_TARGET,
    }


# ---- the report ----------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# Batch API benchmark", ""]
    machine = report["machine"]
    lines.append(
        f"- {machine['cpu']}, {machine['usable_cpus']} usable CPUs, load average at start "
        f"{machine['loadavg_at_start']}; `{report['command']}`"
    )
    part = report.get("completion")
    if part:
        lines += [
            "",
            "## A batch on the tiny checkpoint",
            "",
            f"- {part['lines']} lines ({part['image_lines']} with an image), max_tokens "
            f"{part['max_tokens']}: **{part['status']}** in **{part['wall_s']} s** "
            f"({part['lines_per_s']} lines/s) after create; upload + create "
            f"{part['upload_and_create_s']} s",
            f"- request_counts {part['request_counts']}; output file: {part['output_lines']} "
            f"lines, every custom_id once in input order, all 200: {part['output_exact']}",
        ]
    part = report.get("interference")
    if part:
        lines += [
            "",
            f"## Interactive requests with a batch running (bench preset, {part['rate']} req/s "
            "open loop)",
            "",
            "| | requests ok | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for phase in ("alone", "with_batch"):
            row = part[phase]
            lines.append(
                f"| {phase.replace('_', ' ')} | {row['ok']}/{row['requests']} | "
                f"{row['ttft_p50_ms']} | {row['ttft_p99_ms']} | {row['tpot_p50_ms']} | "
                f"{row['tpot_p99_ms']} |"
            )
        answered = sum(b["answered_during"] for b in part["batch"])
        lines += [
            "",
            f"- TTFT p50 with a batch / without: **{part['ttft_p50_ratio']}** (target "
            f"{part['target']}: {'met' if part['met'] else 'not met'})",
            f"- batch lines answered while measured: {answered} over {part['rounds']} rounds "
            f"({', '.join(str(b['answered_during']) for b in part['batch'])})",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("completion", "interference", "both"), default="both")
    parser.add_argument("--lines", type=int, default=1000, help="completion: batch lines")
    parser.add_argument("--rate", type=float, default=0.8, help="interference: requests/s")
    parser.add_argument(
        "--requests", type=int, default=chat_bench.OPEN_LOOP_REQUESTS, help="per round"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alone/with-batch pairs")
    parser.add_argument(
        "--batch-lines",
        type=int,
        default=400,
        help="interference: lines of each background batch (enough to outlast a round)",
    )
    parser.add_argument(
        "--max-tokens-range",
        default=chat_bench.OPEN_LOOP_MAX_TOKENS,
        type=lambda text: tuple(int(v) for v in text.split(":")),
    )
    parser.add_argument("--image-size", default="448x336")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a batch may take")
    parser.add_argument(
        "--proxy-arg",
        dest="proxy_args",
        action="append",
        default=[],
        help="an extra proxy flag (repeatable), e.g. --proxy-arg=--batch-concurrency=4",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))
    return args


async def run(args) -> dict:
    report: dict = {
        "machine": chat_bench.machine_info("cpu"),
        "command": " ".join(["bench/batch_bench.py", *sys.argv[1:]]),
    }
    if args.part in ("completion", "both"):
        checkpoint = stack_launcher.tiny_checkpoint("tiny")
        with Stack(checkpoint, args) as running:
            model = chat_bench.served_model_id(running.url, "qwen2.5-vl-7b-instruct")
            report["completion"] = await completion(running, model, args)
            log(f"completion: {report['completion']}")
    if args.part in ("interference", "both"):
        checkpoint = stack_launcher.tiny_checkpoint("bench")
        with Stack(checkpoint, args) as running:
            model = chat_bench.served_model_id(running.url, "qwen2.5-vl-7b-instruct")
            report["interference"] = await interference(running, model, args)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    text = markdown(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
