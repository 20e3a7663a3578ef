#!/usr/bin/env python3
"""What the proxy adds over talking to Triton directly: per request and per streamed chunk.

    .venv/bin/python bench/proxy_overhead.py [--model PATH] [--requests 200] [--streams 20]
                                             [--stream-tokens 40] [--out FILE]

Starts one stack (tritonserver + proxy, on loopback and free ports; the tiny random-weight
checkpoint unless --model) and, in one event loop, sends the same requests both ways:

  proxy   aiohttp client -> POST /v1/chat/completions (JSON, or SSE when streamed) -> proxy
          -> Triton gRPC stream. Includes the proxy's whole path (HTTP parse, validation,
          translation, admission, metrics, JSON/SSE encoding) and the client's HTTP parse.
  direct  tritonclient.grpc.aio -> Triton gRPC stream_infer, with the very inputs the proxy
          sends (proxy.request.translate.prepare_chat + proxy.transport.backend.build_inputs). Includes building
          the inputs and the client's protobuf decode (`as_numpy` of text_output).

(a) non-streamed 1-token requests (`max_tokens` 1, temperature 0), sequential, interleaved
    one proxy / one direct (the order alternating): p50/p90 latency of each and the difference.
(b) streamed completions of `--stream-tokens` tokens (greedy), interleaved the same way:
    the inter-arrival time of content chunks (responses carrying text: SSE content events on
    the proxy side, text responses on the direct side), pooled over all streams: p50/p90 and
    the difference per chunk.

No timing is asserted; the numbers are for docs/benchmarks.md ("Proxy overhead").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)
import tritonclient.grpc.aio as grpcclient_aio  # noqa: E402

from proxy.media.pixels import PixelLimits  # noqa: E402
from proxy.request.limits import RequestLimits  # noqa: E402
from proxy.request.schema import parse_chat_request  # noqa: E402
from proxy.request.translate import ServerLimits, prepare_chat  # noqa: E402
from proxy.transport.backend import TritonBackend, TritonRequest, build_inputs  # noqa: E402

PROMPT = "Write a long story about a cat."  # the tiny model runs to max_tokens on it
STREAM_PARAMETERS = {"triton_enable_empty_final_response": True}


def chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def triton_request_for(body: dict[str, Any], triton_url: str) -> TritonRequest:
    """The TritonRequest the proxy makes of `body`: its own translation, the model's limits."""
    backend = TritonBackend(triton_url)
    try:
        model_limits = await backend.describe(stack_launcher.TRITON_MODEL)
    finally:
        await backend.close()
    if model_limits is None:
        raise SystemExit("the model did not describe its limits")
    server = ServerLimits(
        PixelLimits().within(model_limits), int(model_limits.max_tokens), model_limits
    )
    prepared = prepare_chat(parse_chat_request(body), server, RequestLimits().within(model_limits))
    return prepared.to_triton(stack_launcher.TRITON_MODEL, [])


# ---- the two clients -------------------------------------------------------------------


async def proxy_once(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        payload = await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"proxy answered {response.status}: {payload[:300]!r}")
    return elapsed


async def proxy_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> list[float]:
    """Arrival times (perf_counter) of the stream's content events."""
    arrivals: list[float] = []
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"proxy answered {response.status}: {await response.text()}")
        async for line in response.content:
            now = time.perf_counter()
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                arrivals.append(now)
    return arrivals


async def direct_stream(
    client: grpcclient_aio.InferenceServerClient, request: TritonRequest, request_id: str
) -> list[float]:
    """Arrival times of the responses that carry text; the last one is the final response."""
    finished = asyncio.Event()

    async def requests():
        yield {
            "model_name": request.model,
            "inputs": build_inputs(request),
            "request_id": request_id,
            "parameters": STREAM_PARAMETERS,
        }
        await finished.wait()

    arrivals: list[float] = []
    responses = client.stream_infer(requests())
    try:
        async for result, error in responses:
            now = time.perf_counter()
            if error is not None:
                raise RuntimeError(f"Triton: {error}")
            text = result.as_numpy("text_output")
            if text is not None and text.size and any(item for item in text.ravel()):
                arrivals.append(now)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        finished.set()
        responses.cancel()
    return arrivals


async def direct_once(
    client: grpcclient_aio.InferenceServerClient, request: TritonRequest, request_id: str
) -> float:
    started = time.perf_counter()
    await direct_stream(client, request, request_id)
    return time.perf_counter() - started


# ---- the measurement -------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p90_ms": float("nan")}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else ordered
    return {
        "n": len(ordered),
        "p50_ms": ms(statistics.median(ordered)),
        "p90_ms": ms(q[-1] if len(ordered) > 1 else ordered[0]),
    }


def gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


async def measure(proxy_url: str, triton_url: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"{proxy_url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{proxy_url}/v1/models") as response:
            served = (await response.json())["data"][0]["id"]
        one_body = chat_body(served, 1, stream=False)
        stream_body = chat_body(served, args.stream_tokens, stream=True)
        one_request = await triton_request_for(one_body, triton_url)
        stream_request = await triton_request_for(stream_body, triton_url)
        client = grpcclient_aio.InferenceServerClient(triton_url)
        try:
            for i in range(args.warmup):  # connections, caches, the engine's first steps
                await proxy_once(session, url, one_body)
                await direct_once(client, one_request, f"warm-{i}")
            await proxy_stream(session, url, stream_body)
            await direct_stream(client, stream_request, "warm-stream")

            via_proxy: list[float] = []
            direct: list[float] = []
            for i in range(args.requests):
                pair = [
                    lambda: proxy_once(session, url, one_body),
                    lambda i=i: direct_once(client, one_request, f"one-{i}"),
                ]
                order = pair if i % 2 == 0 else pair[::-1]
                for run in order:
                    elapsed = await run()
                    (via_proxy if run is pair[0] else direct).append(elapsed)

            proxy_gaps: list[float] = []
            direct_gaps: list[float] = []
            proxy_chunks = direct_chunks = 0
            for i in range(args.streams):
                pair = [
                    lambda: proxy_stream(session, url, stream_body),
                    lambda i=i: direct_stream(client, stream_request, f"stream-{i}"),
                ]
                order = pair if i % 2 == 0 else pair[::-1]
                for run in order:
                    arrivals = await run()
                    if run is pair[0]:
                        proxy_gaps += gaps(arrivals)
                        proxy_chunks += len(arrivals)
                    else:
                        direct_gaps += gaps(arrivals)
                        direct_chunks += len(arrivals)
        finally:
            await client.close()

    request_proxy, request_direct = percentiles(via_proxy), percentiles(direct)
    chunk_proxy, chunk_direct = percentiles(proxy_gaps), percentiles(direct_gaps)
    return {
        "requests": {
            "n": args.requests,
            "max_tokens": 1,
            "proxy": request_proxy,
            "direct": request_direct,
            "overhead_p50_ms": round(request_proxy["p50_ms"] - request_direct["p50_ms"], 3),
            "overhead_p90_ms": round(request_proxy["p90_ms"] - request_direct["p90_ms"], 3),
        },
        "stream": {
            "streams": args.streams,
            "max_tokens": args.stream_tokens,
            "proxy": {**chunk_proxy, "chunks": proxy_chunks},
            "direct": {**chunk_direct, "chunks": direct_chunks},
            "overhead_p50_ms": round(chunk_proxy["p50_ms"] - chunk_direct["p50_ms"], 3),
            "overhead_p90_ms": round(chunk_proxy["p90_ms"] - chunk_direct["p90_ms"], 3),
        },
        "sides": {
            "proxy": "aiohttp client -> proxy HTTP (parse, validate, translate, admit, observe, "
            "encode JSON/SSE) -> Triton gRPC stream; includes the client's HTTP read",
            "direct": "tritonclient.grpc.aio stream_infer with the inputs the proxy sends "
            "(build_inputs per request); includes the client's protobuf decode",
        },
    }


def table(result: dict[str, Any]) -> str:
    req, stream = result["requests"], result["stream"]
    rows = [
        ("", "proxy p50", "direct p50", "overhead p50", "proxy p90", "direct p90"),
        (
            f"request (max_tokens 1, n={req['n']})",
            req["proxy"]["p50_ms"],
            req["direct"]["p50_ms"],
            req["overhead_p50_ms"],
            req["proxy"]["p90_ms"],
            req["direct"]["p90_ms"],
        ),
        (
            f"chunk gap ({stream['max_tokens']} tokens x {stream['streams']} streams)",
            stream["proxy"]["p50_ms"],
            stream["direct"]["p50_ms"],
            stream["overhead_p50_ms"],
            stream["proxy"]["p90_ms"],
            stream["direct"]["p90_ms"],
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.append("(ms)  proxy: " + result["sides"]["proxy"])
    lines.append("      direct: " + result["sides"]["direct"])
    lines.append(f"per-request overhead p50: {req['overhead_p50_ms']} ms")
    lines.append(f"per-chunk overhead p50: {stream['overhead_p50_ms']} ms")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint path (default: the tiny random-weight one)")
    parser.add_argument("--requests", type=int, default=200, help="non-streamed, each side")
    parser.add_argument("--streams", type=int, default=20, help="streamed completions, each side")
    parser.add_argument("--stream-tokens", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--proxy-url", help="measure a running stack (with --triton-url) instead of starting one"
    )
    parser.add_argument("--triton-url", help="Triton gRPC host:port of the running stack")
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra proxy flag")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.proxy_url and args.triton_url:
        result = asyncio.run(measure(args.proxy_url, args.triton_url, args))
    else:
        model = args.model or stack_launcher.tiny_checkpoint()
        config = stack_launcher.loopback_config(model, proxy_args=list(args.proxy_arg))
        running = stack_launcher.Stack(config)
        running.start()
        try:
            running.wait_ready(timeout=300)
            result = asyncio.run(measure(config.proxy_url, config.triton_grpc_url, args))
        finally:
            running.stop()
        result["model"] = model
    result["checkout"] = str(ROOT)
    result["python"] = platform.python_version()
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
