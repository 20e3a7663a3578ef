#!/usr/bin/env python3
"""The engine under Triton against the same engine in-process, side by side.

    .venv/bin/python bench/triton_path_bench.py [--concurrency 8] [--tokens 64] [--rounds 3]
        [--threads 0 1 2] [--inprocess-threads 2] [--checkpoint .cache/bench-qwen2.5-vl]

One workload, c closed-loop greedy text streams of --tokens tokens each (the bench preset
never stops early), run three ways, interleaved round by round with the order rotating:

  in-process   BatchingEngine in this process (torch threads --inprocess-threads), the sink
               timestamps each chunk: the engine alone.
  triton tN    tritonserver with the model (parameter torch_threads=N; 0 = the model's
               derived default), driven by tritonclient.grpc.aio stream_infer with the inputs
               the proxy sends: engine + stub + IPC + tritonserver + gRPC, no proxy.

All servers stay up for the whole run; the idle ones cost nothing measurable. Reported per
way: output tokens/s (median over rounds), ITL p50/p99 (all gaps pooled), and each Triton way
as a share of in-process; plus, per tritonserver, the CPU seconds per token of the stub's
threads (its busiest threads by name), the numbers behind "where the time goes". Nothing is
asserted: the numbers are for docs/benchmarks.md ("Triton path against in-process").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "model_repository/qwen2_5_vl/1"), str(ROOT / "scripts")]

import stack  # noqa: E402
import tritonclient.grpc.aio as grpcclient_aio  # noqa: E402
from host_path_bench import Sink  # noqa: E402  (bench/ is this script's sys.path[0])

from proxy.transport.backend import TritonRequest, build_inputs  # noqa: E402

MODEL = stack.TRITON_MODEL
STREAM_PARAMETERS = {"triton_enable_empty_final_response": True}
# Room for 16 rows of prompt + completion; the same for both sides.
ENGINE_ENV = {"QWEN_VL_MAX_BATCH_SIZE": "16", "QWEN_VL_MAX_CACHE_TOKENS": "16384"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / ".cache" / "bench-qwen2.5-vl"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0], help="torch_threads of each tritonserver"
    )
    parser.add_argument("--inprocess-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--repositories",
        type=Path,
        nargs="+",
        default=[None],
        help="model repositories to compare (e.g. a worktree of another commit's "
        "model_repository); default: this checkout's",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    return parser.parse_args(argv)


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me story number {i}."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- in-process --------------------------------------------------------------------------


class InProcess:
    def __init__(self, checkpoint: str, threads: int):
        import torch

        from qwen_vl_backend.engine.batching import BatchingEngine
        from qwen_vl_backend.modeling.checkpoint import load_checkpoint
        from qwen_vl_backend.settings import ModelSettings

        torch.set_num_threads(threads)
        settings = ModelSettings(max_batch_size=16, max_cache_tokens=16384)
        self.engine = BatchingEngine(load_checkpoint(checkpoint, "cpu", "float32"), settings)

    def run(self, c: int, tokens: int) -> tuple[float, list[list[float]]]:
        from qwen_vl_backend.request.prepare import RawRequest

        sinks = [Sink(send_s=0.0, cancel_s=0.0) for _ in range(c)]
        started = time.perf_counter()
        for i, sink in enumerate(sinks):
            request = RawRequest(
                request_id=str(i),
                messages=json.dumps(messages(i)),
                stream=True,
                exclude_input_in_output=True,
                sampling_parameters=json.dumps({"max_tokens": tokens, "temperature": 0}),
            )
            self.engine.submit(request, sink)
        for sink in sinks:
            if not sink.done.wait(600) or sink.error is not None:
                raise RuntimeError(f"in-process request failed: {sink.error}")
        return time.perf_counter() - started, [s.times for s in sinks]

    def close(self):
        self.engine.shutdown(30)


# ---- tritonserver ------------------------------------------------------------------------


class TritonServer:
    def __init__(self, checkpoint: str, threads: int, log_dir: Path, repository: Path | None):
        env = {**ENGINE_ENV, "QWEN_VL_DTYPE": "float32", "QWEN_VL_TORCH_THREADS": str(threads)}
        self.config = stack.loopback_config(checkpoint, extra_env=env, log_dir=log_dir)
        self.name = f"triton t{threads}" + (f" {repository}" if repository else "")
        self.log = open(log_dir / f"{self.name.replace('/', '_').replace(' ', '-')}.log", "wb")
        command = stack.triton_command(self.config)
        if repository:
            command = [
                f"--model-repository={repository}" if arg.startswith("--model-repository=") else arg
                for arg in command
            ]
        self.proc = subprocess.Popen(
            command,
            env=stack.stack_env(self.config),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600):
        url = f"{self.config.triton_http_url}/v2/models/{MODEL}/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def phase_seconds(self) -> dict[str, float]:
        """The engine's host-path timers as the model exports them (updated when it idles)."""
        url = f"http://127.0.0.1:{self.config.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith("qwen_vl_engine_step_seconds_total{"):
                phase = line.split('phase="', 1)[1].split('"', 1)[0]
                found[f"{phase}_s"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("qwen_vl_engine_steps_total{"):
                found["steps"] = float(line.rsplit(" ", 1)[1])
        return found

    def stub_pids(self) -> list[int]:
        return [pid for pid in stack.group_members(self.proc.pid) if pid != self.proc.pid]

    def stop(self):
        stack.end_process_group(self.proc)
        self.log.close()


async def triton_stream(client, i: int, tokens: int) -> list[float]:
    request = TritonRequest(
        MODEL, json.dumps(messages(i)), {}, {"max_tokens": tokens, "temperature": 0}, stream=True
    )
    finished = asyncio.Event()

    async def requests():
        yield {
            "model_name": MODEL,
            "inputs": build_inputs(request),
            "request_id": str(i),
            "parameters": STREAM_PARAMETERS,
        }
        await finished.wait()  # closing the request side early would end the stream

    times = []
    responses = client.stream_infer(requests())
    try:
        async for result, error in responses:
            if error is not None:
                raise RuntimeError(f"Triton: {error}")
            response = result.get_response()
            if response.outputs:
                times.append(time.perf_counter())
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        finished.set()
    return times


def run_triton(server: TritonServer, c: int, tokens: int) -> tuple[float, list[list[float]]]:
    async def main():
        client = grpcclient_aio.InferenceServerClient(server.config.triton_grpc_url)
        try:
            started = time.perf_counter()
            streams = await asyncio.gather(*(triton_stream(client, i, tokens) for i in range(c)))
            return time.perf_counter() - started, list(streams)
        finally:
            await client.close()

    return asyncio.run(main())


# ---- CPU per thread ----------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds of one process, all its threads (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds by thread name over the given processes (utime + stime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            key = f"{name}#{task.name}"
            totals[key] = (int(fields[11]) + int(fields[12])) / ticks
    return totals


# ---- the run -----------------------------------------------------------------------------


def summarize(walls: list[float], streams: list[list[float]], c: int, tokens: int) -> dict:
    gaps = [b - a for times in streams for a, b in zip(times, times[1:])]
    rates = [c * tokens / wall for wall in walls]
    return {
        "out_tok_s": round(statistics.median(rates), 1),
        "out_tok_s_rounds": [round(r, 1) for r in rates],
        "itl_p50_ms": round(1e3 * percentile(gaps, 0.5), 2),
        "itl_p99_ms": round(1e3 * percentile(gaps, 0.99), 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="triton-path-"))
    servers = [
        TritonServer(args.checkpoint, t, log_dir, repository)
        for repository in args.repositories
        for t in args.threads
    ]
    try:
        inprocess = InProcess(args.checkpoint, args.inprocess_threads)
        for server in servers:
            server.wait_ready()
        ways = {"in-process": lambda: inprocess.run(args.concurrency, args.tokens)}
        for server in servers:
            ways[server.name] = lambda s=server: run_triton(s, args.concurrency, args.tokens)
        for run in ways.values():  # warm-up: first-call costs out of the rounds
            run()
        walls = {name: [] for name in ways}
        streams = {name: [] for name in ways}
        cpu = {server.name: {} for server in servers}
        # CPU seconds by process: this one (the engine in-process, the gRPC client otherwise),
        # tritonserver itself, its stub.
        processes = {name: {"bench": 0.0, "tritonserver": 0.0, "stub": 0.0} for name in ways}
        # The engine's own timers per way: where a step's time goes on each side.
        phases = {name: {} for name in ways}

        def timers(server):
            if server is None:
                return inprocess.engine.stats.timings()
            time.sleep(0.5)  # the model reports its timers when the engine goes idle
            return server.phase_seconds()

        names = list(ways)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                server = next((s for s in servers if s.name == name), None)
                before = thread_cpu(server.stub_pids()) if server else {}
                timed = timers(server)
                mine = process_cpu(os.getpid())
                served = process_cpu(server.proc.pid) if server else 0.0
                wall, got = ways[name]()
                processes[name]["bench"] += process_cpu(os.getpid()) - mine
                if server:
                    processes[name]["tritonserver"] += process_cpu(server.proc.pid) - served
                    after = thread_cpu(server.stub_pids())
                    processes[name]["stub"] += sum(after.values()) - sum(before.values())
                    for key, seconds in after.items():
                        cpu[name][key] = cpu[name].get(key, 0.0) + seconds - before.get(key, 0.0)
                for key, value in timers(server).items():
                    if key in timed and (key.endswith("_s") or key == "steps"):
                        phases[name][key] = phases[name].get(key, 0.0) + value - timed[key]
                walls[name].append(wall)
                streams[name].extend(got)
        total_tokens = args.rounds * args.concurrency * args.tokens
        report = {
            "checkpoint": args.checkpoint,
            "concurrency": args.concurrency,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "cores": len(os.sched_getaffinity(0)),
            "load_avg": os.getloadavg(),
            "inprocess_threads": args.inprocess_threads,
            "ways": {
                name: summarize(walls[name], streams[name], args.concurrency, args.tokens)
                for name in ways
            },
        }
        for name in ways:
            report["ways"][name]["cpu_ms_per_token"] = {
                key: round(1e3 * seconds / total_tokens, 3)
                for key, seconds in processes[name].items()
            }
            steps = max(1.0, phases[name].pop("steps", 0.0))
            report["ways"][name]["engine_ms_per_step"] = {
                key[:-2]: round(1e3 * seconds / steps, 3) for key, seconds in phases[name].items()
            }
            report["ways"][name]["steps"] = int(steps)
            report["ways"][name]["wall_ms_per_token"] = round(
                1e3 * sum(walls[name]) / total_tokens, 3
            )
        base = report["ways"]["in-process"]["out_tok_s"]
        for server in servers:
            way = report["ways"][server.name]
            way["share_of_inprocess"] = round(way["out_tok_s"] / base, 3)
            busiest = sorted(cpu[server.name].items(), key=lambda kv: -kv[1])[:6]
            way["stub_cpu_ms_per_token"] = {
                key: round(1e3 * seconds / total_tokens, 3) for key, seconds in busiest
            }
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        inprocess.close()
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
