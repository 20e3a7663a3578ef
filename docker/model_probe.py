"""Whether the model can serve: it answers a `describe` request through Triton.

    python3 model_probe.py [--url http://127.0.0.1:8000] [--model qwen2_5_vl] [--timeout 5]

Exit status 0 when the model answers, 1 when it does not (an error answer, or none within the
timeout). Triton's own /v2/health/ready and /v2/models/<model>/ready say nothing about the
model's process: they stay 200 after the Python-backend stub died (the OOM killer, a crash in
native code), and Triton 2.51 never restarts a decoupled model's stub. Only a request reaches
the stub, so the Kubernetes readiness and liveness probes of the Triton pod run this, and
`watch` (triton_launch.py in the image, scripts/stack.py outside it) stops or restarts a
tritonserver whose model died. The `describe` request is the cheapest one the model has: its
execute thread answers with its limits, no generation step runs.

Standard library only: it runs under the Triton image's system python3.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "qwen2_5_vl"
# A dead stub's answer takes Triton's one-second stub health check; a healthy model answers
# in milliseconds unless its engine holds the GIL for long.
DEFAULT_TIMEOUT_S = 5.0
# How often `watch` asks, and how many deaths among its last answers it takes to believe
# one: not necessarily in a row, since with several instances of the model Triton spreads the
# questions over them, and one dead instance answers only some.
WATCH_EVERY_S = 1.0
WATCH_MISSES = 2
WATCH_WINDOW = 4


def ask(url: str, model: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """True when the model answers `describe`, False when Triton answers with an error (the
    model's process is gone, the model is not loaded), None when nothing answers in time."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{model}/generate",
        data=json.dumps({"describe": True}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, OSError):  # refused, reset, timed out
        return None


def died(url: str, model: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """The model's process is gone: Triton answers its `describe` with an error while it says
    the model is loaded (a model not loaded yet, or loading, is not dead)."""
    if ask(url, model, timeout_s) is not False:
        return False
    try:
        with urllib.request.urlopen(
            f"{url.rstrip('/')}/v2/models/{model}/ready", timeout=timeout_s
        ):
            return True  # 200: Triton calls it ready
    except (urllib.error.URLError, OSError):
        return False


def watch(url: str, model: str, stop: Callable[[float], bool]) -> bool:
    """True once the model's process died (`WATCH_MISSES` of the last `WATCH_WINDOW`
    checks); False when `stop(WATCH_EVERY_S)`, which waits that long between checks, says
    to stop."""
    last = deque(maxlen=WATCH_WINDOW)
    while not stop(WATCH_EVERY_S):
        last.append(died(url, model))
        if sum(last) >= WATCH_MISSES:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton's HTTP endpoint")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    args = parser.parse_args(argv)
    answered = ask(args.url, args.model, args.timeout)
    if not answered:
        print(f"model {args.model} does not answer at {args.url}", file=sys.stderr)
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
