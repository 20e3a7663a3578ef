#!/usr/bin/env python3
"""How long serving stops when the model's process dies: one stack (tiny checkpoint, loopback,
scripts/stack.py with its model watch on, as `scripts/serve` runs it), the model's
Python-backend stub SIGKILLed `--deaths` times under `--streams` running streams.

    .venv/bin/python bench/model_death_bench.py [--deaths 3] [--streams 3] [--out FILE]

Per death, seconds after the SIGKILL: until every stream ended (an SSE error event and
[DONE]), until the proxy's /ready said 503, until the watch had restarted tritonserver and
/ready said 200 again, and until a chat completion succeeded. Numbers, no verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import stack as launcher  # noqa: E402  (scripts/stack.py)

ENDLESS = {"max_tokens": 2000, "ignore_eos": True}


def chat(base_url: str, *, stream: bool, **fields) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "talk"}], "stream": stream, **fields}
    return requests.post(f"{base_url}/v1/chat/completions", json=body, stream=stream, timeout=300)


def status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.RequestException:
        return None


def stub_of(stack: launcher.Stack) -> int:
    for pid in launcher.group_members(stack.triton.pid):
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        if argv0.endswith(b"triton_python_backend_stub"):
            return pid
    raise RuntimeError("no model stub in tritonserver's process group")


def until(condition, since: float, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never held")
        time.sleep(0.05)
    return time.monotonic() - since


def one_death(stack: launcher.Stack, streams: int) -> dict[str, float]:
    base = stack.config.proxy_url
    responses = [chat(base, stream=True, seed=i, **ENDLESS) for i in range(streams)]
    readers = [(r, (line for line in r.iter_lines() if line)) for r in responses]
    for _, lines in readers:
        next(lines)
        next(lines)  # past the first token
    ended: list[float] = []

    def drain(response, lines):
        with response:
            last = list(lines)[-2:]
        assert last[-1] == b"data: [DONE]" and b'"error"' in last[0], last
        ended.append(time.monotonic() - killed)

    killed = time.monotonic()
    os.kill(stub_of(stack), signal.SIGKILL)
    drains = [threading.Thread(target=drain, args=reader) for reader in readers]
    for thread in drains:
        thread.start()
    unready = until(lambda: status(f"{base}/ready") == 503, killed)
    ready = until(lambda: status(f"{base}/ready") == 200, killed)
    served = until(lambda: chat(base, stream=False, max_tokens=2).status_code == 200, killed)
    for thread in drains:
        thread.join()
    return {
        "streams_ended_s": max(ended),
        "unready_s": unready,
        "ready_s": ready,
        "served_s": served,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deaths", type=int, default=3)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = launcher.loopback_config(
        launcher.tiny_checkpoint(), watch_model=True, exit_timeout_s=5
    )
    stack = launcher.Stack(config)
    try:
        stack.start()
        stack.wait_ready(300)
        runs = [one_death(stack, args.streams) for _ in range(args.deaths)]
    finally:
        stack.stop()
    report = {
        "runs": runs,
        "median": {key: statistics.median(run[key] for run in runs) for key in runs[0]},
        "restarts": stack.model_restarts,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
