#!/usr/bin/env python3
"""What OpenTelemetry tracing costs in the proxy: off (the default), on, and before it existed.

    .venv/bin/python bench/tracing_overhead.py [--baseline REV] [--requests 300] [--streams 20]
                                              [--stream-tokens 40] [--out FILE]

Starts one tritonserver (the tiny random-weight checkpoint unless --model) and, in front of it,
proxies that differ only in tracing:

  off       this checkout, no --trace-otlp-endpoint (the default)
  on        this checkout, every request traced (--trace-sample-ratio 1) and exported to a
            receiver in this process that answers 200 without decoding
  baseline  (with --baseline REV) the proxy/ folder of REV (`git archive`), e.g. the commit
            before tracing: what "off" is compared with to say it costs nothing

and sends the same requests to each in turn, the order rotating every round so the noise of a
shared machine hits every mode alike: (a) non-streamed 1-token requests, sequential: p50/p90
latency per mode; (b) streamed completions of --stream-tokens tokens: the gaps between content
chunks, pooled per mode. The model's own tracing stays off (it would be shared by all modes).

No timing is asserted; the numbers are for docs/observability.md ("Cost when off").
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)
from aiohttp import web  # noqa: E402
from proxy_overhead import chat_body, gaps, percentiles, proxy_once, proxy_stream  # noqa: E402


class NullReceiver:
    """An OTLP/HTTP endpoint on 127.0.0.1 that takes every body and keeps only the count."""

    def __init__(self) -> None:
        self.bodies = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/traces", self._take)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _take(self, request: web.Request) -> web.Response:
        await request.read()
        self.bodies += 1
        return web.Response()


def proxy_process(
    source: Path, config: stack_launcher.StackConfig, port: int, args: list[str], log: Path
) -> subprocess.Popen:
    """`python -m proxy` from `source` (a checkout's root) in front of the stack's Triton."""
    command = [
        sys.executable,
        "-m",
        "proxy",
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--triton-url", config.triton_grpc_url, "--triton-model", stack_launcher.TRITON_MODEL),
        *("--no-state", "--workers", "1", *args),
    ]
    env = {**stack_launcher.stack_env(config), "PYTHONPATH": str(source)}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "1000"  # ms: the `on` proxy exports during the run
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=source,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not get ready")


async def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    modes = list(urls)
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    chunk_gaps: dict[str, list[float]] = {mode: [] for mode in modes}
    connector = aiohttp.TCPConnector(limit=len(modes))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{urls[modes[0]]}/v1/models") as response:
            served = (await response.json())["data"][0]["id"]
        one, streamed = chat_body(served, 1, False), chat_body(served, args.stream_tokens, True)
        for _ in range(args.warmup):
            for mode in modes:
                await proxy_once(session, f"{urls[mode]}/v1/chat/completions", one)
        for i in range(args.requests):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                url = f"{urls[mode]}/v1/chat/completions"
                latencies[mode].append(await proxy_once(session, url, one))
        for i in range(args.streams):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                url = f"{urls[mode]}/v1/chat/completions"
                chunk_gaps[mode] += gaps(await proxy_stream(session, url, streamed))
    return {
        "requests": {mode: percentiles(latencies[mode]) for mode in modes},
        "chunk_gaps": {mode: percentiles(chunk_gaps[mode]) for mode in modes},
    }


def baseline_source(rev: str, into: Path) -> Path:
    """The proxy/ folder of `rev`, unpacked under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "proxy"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into)  # noqa: S202  (this repository's own archive)
    return into


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'mode':<10} {'request p50':>12} {'request p90':>12} {'chunk p50':>10} {'chunk p90':>10}"
    ]
    for mode, request in result["requests"].items():
        chunk = result["chunk_gaps"][mode]
        lines.append(
            f"{mode:<10} {request['p50_ms']:>10.3f}ms {request['p90_ms']:>10.3f}ms "
            f"{chunk['p50_ms']:>8.3f}ms {chunk['p90_ms']:>8.3f}ms"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint path (default: the tiny random-weight one)")
    parser.add_argument("--baseline", help="a git revision whose proxy runs as `baseline`")
    parser.add_argument("--requests", type=int, default=300, help="non-streamed, each mode")
    parser.add_argument("--streams", type=int, default=20, help="streamed, each mode")
    parser.add_argument("--stream-tokens", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or stack_launcher.tiny_checkpoint()
    config = stack_launcher.loopback_config(model)
    running = stack_launcher.Stack(config)
    receiver = NullReceiver()
    proxies: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tracing-bench-") as scratch:
        modes: dict[str, tuple[Path, list[str]]] = {
            "off": (ROOT, []),
            "on": (ROOT, ["--trace-otlp-endpoint", receiver.url, "--trace-sample-ratio", "1"]),
        }
        if args.baseline:
            modes["baseline"] = (baseline_source(args.baseline, Path(scratch)), [])
        try:
            running.start_triton()
            urls = {}
            for mode, (source, flags) in modes.items():
                port = stack_launcher.free_port()
                log = Path(scratch) / f"proxy-{mode}.log"
                proxies.append(proxy_process(source, config, port, flags, log))
                urls[mode] = f"http://127.0.0.1:{port}"
            for url in urls.values():
                wait_ready(url, timeout=300)
            result = asyncio.run(measure(urls, args))
        finally:
            for process in proxies:
                stack_launcher.end_process_group(process)
            running.stop()
    result.update(
        model=model,
        baseline=args.baseline,
        exported_bodies=receiver.bodies,
        python=platform.python_version(),
        requests_per_mode=args.requests,
        streams_per_mode=args.streams,
        stream_tokens=args.stream_tokens,
    )
    print(table(result))
    print(f"OTLP bodies the `on` proxy exported: {receiver.bodies}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
