#!/usr/bin/env python3
"""The path after the engine at GPU token rates: stub -> tritonserver -> gRPC -> proxy -> SSE.

    .venv/bin/python bench/stream_path_bench.py [--concurrency 1,16,64] [--tokens 512]
        [--requests 32] [--rounds 2] [--proxy-workers 1,2] [--proxy-arg=--flag=value] [--out F]

Starts tritonserver with the flood model (tests/proxy/triton_models/flood: no engine, every
request streams `max_tokens` one-token responses as fast as Triton takes them) and one proxy
(`python -m proxy --workers=N`) per --proxy-workers value in front of it, on loopback and free
ports. At each concurrency c it runs max(c, --requests) streams of --tokens tokens, c at a
time, on every side, interleaved (the order rotating each round):

  direct      tritonclient.grpc.aio stream_infer with the inputs the proxy sends
              (build_inputs); the client only counts responses (no tensor decoding).
  proxy Nw    aiohttp -> POST /v1/chat/completions, stream=true -> the N-worker proxy ->
              Triton gRPC stream; the client reads the SSE body and counts content events.

For each run: aggregate tokens/s; the CPU time (utime + stime, /proc) per token of each
process: tritonserver, the Python-backend stub, the proxy (its workers included), this
client; the same for each process's busiest thread, since a thread can use one core at most:
1e6 / (its µs per token) is the rate at which it would be 100 % busy, and the lowest of these
is the first ceiling on a machine with a core free for each busy thread; and the cores the
rest of the machine kept busy (`other`: other users of a shared machine). No timing is
asserted; the numbers are for docs/benchmarks.md ("Stream path at GPU token rates").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import stack as stack_launcher  # noqa: E402  (scripts/stack.py)
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as grpcclient_aio  # noqa: E402

from proxy.transport.backend import TritonRequest, build_inputs  # noqa: E402

FLOOD_MODEL_DIR = ROOT / "tests" / "proxy" / "triton_models" / "flood"
MODEL = "flood"
STREAM_PARAMETERS = {"triton_enable_empty_final_response": True}  # as the proxy asks
MESSAGES = [{"role": "user", "content": "Stream as fast as you can."}]
CONTENT_EVENT = b'"delta":{"content":'  # one per token in the proxy's SSE chunks
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60
PROCESSES = ("tritonserver", "stub", "proxy", "client")


# ---- the servers ------------------------------------------------------------------------


def _wait(ready, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def flood_tritonserver(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """tritonserver serving the flood model on a free loopback port: (gRPC url, process)."""
    binary, backends = stack_launcher.find_tritonserver()
    shutil.copytree(FLOOD_MODEL_DIR, root / "models" / MODEL)
    port = stack_launcher.free_port()
    command = [
        binary,
        f"--model-repository={root / 'models'}",
        "--allow-http=false",
        "--allow-metrics=false",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={port}",
        "--exit-timeout-secs=5",
    ]
    if backends:
        command.append(f"--backend-directory={backends}")
    env = dict(os.environ)
    # The stub finds its Python (this venv, numpy < 2) through PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = root / "tritonserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{port}"
    client = grpcclient.InferenceServerClient(url)

    def ready() -> bool:
        try:
            return client.is_model_ready(MODEL)
        except Exception:  # not listening yet
            return False

    try:
        _wait(ready, "tritonserver", process, log)
        yield url, process
    finally:
        client.close()
        _stop(process)


@contextlib.contextmanager
def proxy_server(
    root: Path, label: str, triton_url: str, extra: list[str]
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m proxy` in front of `triton_url`: (base url, process)."""
    port = stack_launcher.free_port()
    command = [
        sys.executable,
        "-m",
        "proxy",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--triton-url={triton_url}",
        f"--triton-model={MODEL}",
        f"--served-model-name={MODEL}",
        "--no-image-fetch",
        "--log-level=WARNING",  # a log line per request would be part of what is measured
        *extra,
    ]
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROXY_")}
    log = root / f"{label.replace(' ', '-')}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait(ready, "proxy", process, log)
        yield url, process
    finally:
        _stop(process)


# ---- CPU time per process and thread ------------------------------------------------------


def _stat_fields(path: Path) -> list[str]:
    """A /proc stat file after the command name: state is [0], ppid [1], utime [11], stime [12]."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return text[text.rfind(")") + 2 :].split()


def children(pid: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").glob("[0-9]*")
        if (fields := _stat_fields(entry / "stat")) and fields[1] == str(pid)
    ]


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


def thread_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system) of every live thread of `pids`, by thread id."""
    seconds = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            seconds[int(task.name)] = _cpu(_stat_fields(task / "stat"))
    return seconds


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (not idle, not waiting for I/O), all cores."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


@dataclass
class Sample:
    processes: dict[str, float]  # CPU seconds of each process (its exited threads included)
    threads: dict[str, dict[int, float]]  # and of each of its live threads
    machine: float

    @classmethod
    def of(cls, pids: dict[str, list[int]]) -> Sample:
        return cls(
            {
                name: sum(_cpu(_stat_fields(Path(f"/proc/{pid}/stat"))) for pid in group)
                for name, group in pids.items()
            },
            {name: thread_seconds(group) for name, group in pids.items()},
            machine_busy_seconds(),
        )


@dataclass
class CpuUse:
    """CPU seconds over one run: each process's, its busiest thread's, the rest of the machine's."""

    total: dict[str, float]
    busiest: dict[str, float]
    other: float  # other users of a shared machine, idle proxies

    @classmethod
    def between(cls, before: Sample, after: Sample, proxy: str) -> CpuUse:
        """`proxy`: the label of the proxy measured, reported as `proxy`."""
        total, busiest = {}, {}
        for name, threads in after.threads.items():
            total[name] = after.processes[name] - before.processes[name]
            old = before.threads[name]
            busiest[name] = max((s - old.get(tid, 0.0) for tid, s in threads.items()), default=0.0)
        other = after.machine - before.machine - sum(total.values())
        total["proxy"], busiest["proxy"] = total.pop(proxy, 0.0), busiest.pop(proxy, 0.0)
        for name in [name for name in total if name.startswith("proxy ")]:
            del total[name], busiest[name]
        return cls(total, busiest, other)


# ---- one stream each way ------------------------------------------------------------------


async def direct_stream(client: grpcclient_aio.InferenceServerClient, tokens: int, rid: str) -> int:
    """One stream through tritonclient's gRPC aio client; the responses that carry outputs."""
    request = TritonRequest(MODEL, json.dumps(MESSAGES), {}, {"max_tokens": tokens}, stream=True)
    finished = asyncio.Event()

    async def requests():
        yield {
            "model_name": MODEL,
            "inputs": build_inputs(request),
            "request_id": rid,
            "parameters": STREAM_PARAMETERS,
        }
        await finished.wait()  # closing the request side early would end the stream

    count = 0
    completed = False
    responses = client.stream_infer(requests())
    try:
        async for result, error in responses:
            if error is not None:
                raise RuntimeError(f"Triton: {error}")
            response = result.get_response()
            count += bool(response.outputs)
            if response.parameters["triton_final_response"].bool_param:
                completed = True
                break
    finally:
        finished.set()
        if not completed:
            responses.cancel()
    return count


async def proxy_stream(session: aiohttp.ClientSession, url: str, tokens: int) -> int:
    """One streamed chat completion through the proxy; its content events."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": tokens, "stream": True}
    async with session.post(url, json=body) as response:
        payload = await response.read()
    if response.status != 200 or not payload.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"proxy answered {response.status}: {payload[-300:]!r}")
    return payload.count(CONTENT_EVENT)


async def run_streams(one_stream, concurrency: int, count: int) -> int:
    """`count` streams, `concurrency` at a time; the tokens they brought."""
    left = [count]
    totals = []

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            totals.append(await one_stream())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(totals)


# ---- the measurement ----------------------------------------------------------------------


async def measure(
    triton_url: str, proxies: dict[str, str], pids: dict[str, list[int]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every side at every concurrency, `--rounds` times, the order of the sides rotating."""
    client = grpcclient_aio.InferenceServerClient(triton_url)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    serial = iter(range(1 << 62))
    sides = {"direct": lambda: direct_stream(client, args.tokens, f"bench-{next(serial)}")}
    for label, url in proxies.items():
        chat_url = f"{url}/v1/chat/completions"
        sides[label] = lambda chat_url=chat_url: proxy_stream(session, chat_url, args.tokens)
    runs: list[dict[str, Any]] = []
    try:
        for stream in sides.values():  # connections, the model's first sends
            await run_streams(stream, args.warmup, args.warmup)
        for concurrency in args.concurrency:
            count = max(concurrency, args.requests)
            for round_index in range(args.rounds):
                names = list(sides)
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    run = await one_run(name, sides[name], concurrency, count, pids)
                    if run["tokens"] != count * args.tokens:
                        raise RuntimeError(
                            f"{name}: {run['tokens']} tokens, not {count} x {args.tokens}"
                        )
                    runs.append(run)
                    print(row(run), flush=True)
    finally:
        await session.close()
        await client.close()
    return runs


async def one_run(side: str, stream, concurrency: int, count: int, pids: dict) -> dict:
    before, started = Sample.of(pids), time.perf_counter()
    tokens = await run_streams(stream, concurrency, count)
    wall = time.perf_counter() - started
    use = CpuUse.between(before, Sample.of(pids), proxy=side)
    per_token = {name: 1e6 * use.total[name] / tokens for name in PROCESSES}
    busiest = {name: 1e6 * use.busiest[name] / tokens for name in PROCESSES}
    limit = max(busiest, key=busiest.get)
    return {
        "side": side,
        "concurrency": concurrency,
        "streams": count,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall),
        "cpu_us_per_token": {name: round(value, 1) for name, value in per_token.items()},
        "busiest_thread_us_per_token": {name: round(value, 1) for name, value in busiest.items()},
        # Where each process's busiest thread would reach a whole core first.
        # None when a run is too short for the kernel's CPU clock ticks to register any use.
        "first_ceiling": {
            "process": limit,
            "tokens_per_s": round(1e6 / busiest[limit]) if busiest[limit] > 0 else None,
        },
        "cores_busy": {name: round(use.total[name] / wall, 2) for name in PROCESSES},
        "other_cores_busy": round(use.other / wall, 2),
    }


HEADER = (
    "| c | side | tok/s | CPU µs/token: triton / stub / proxy / client (sum) "
    "| busiest thread µs/token: triton / stub / proxy / client | first ceiling | other cores |\n"
    "|---:|---|---:|---|---|---|---:|"
)


def row(run: dict[str, Any]) -> str:
    per_token, busiest = run["cpu_us_per_token"], run["busiest_thread_us_per_token"]
    costs = " / ".join(f"{per_token[name]:.0f}" for name in PROCESSES)
    threads = " / ".join(f"{busiest[name]:.0f}" for name in PROCESSES)
    ceiling = run["first_ceiling"]
    return (
        f"| {run['concurrency']} | {run['side']} | {run['tokens_per_s']} "
        f"| {costs} ({sum(per_token.values()):.0f}) | {threads} "
        f"| {ceiling['process']} ≈{ceiling['tokens_per_s'] or '–'} | {run['other_cores_busy']:.2f} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def numbers(text: str) -> list[int]:
        return [int(item) for item in text.split(",")]

    parser.add_argument(
        "--concurrency", type=numbers, default=[1, 16, 64], help="streams in flight, a,b,..."
    )
    parser.add_argument("--tokens", type=int, default=512, help="tokens per stream")
    parser.add_argument("--requests", type=int, default=32, help="streams per run, at least c")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side and concurrency")
    parser.add_argument("--warmup", type=int, default=4, help="streams per side first")
    parser.add_argument(
        "--proxy-workers",
        type=numbers,
        default=[1],
        help="one proxy per value, started with --workers=<value>, each a side of its own",
    )
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra proxy flag")
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as servers:
        scratch = Path(servers.enter_context(tempfile.TemporaryDirectory(prefix="stream-path-")))
        triton_url, triton = servers.enter_context(flood_tritonserver(scratch))
        proxies, pids = {}, {"tritonserver": [triton.pid], "stub": children(triton.pid)}
        for workers in args.proxy_workers:
            label = f"proxy {workers}w"
            cap = max(args.concurrency)  # no run meets a 429
            extra = [f"--workers={workers}", f"--max-concurrent-requests={cap}", *args.proxy_arg]
            url, proxy = servers.enter_context(proxy_server(scratch, label, triton_url, extra))
            proxies[label], pids[label] = url, [proxy.pid, *children(proxy.pid)]
        pids["client"] = [os.getpid()]
        print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)
        print(HEADER, flush=True)
        runs = asyncio.run(measure(triton_url, proxies, pids, args))
    result = {
        "runs": runs,
        "pids": pids,
        "tokens_per_stream": args.tokens,
        "proxy_args": args.proxy_arg,
        "load_average_after": os.getloadavg(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(f"load average after: {result['load_average_after']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
