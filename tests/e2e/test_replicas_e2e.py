"""Two real tritonservers (tiny checkpoint) behind one proxy, through bench/replicas_bench.py's
measurement: both take requests, a replica killed mid-load fails no request that had not
started streaming while /ready stays 200, and it takes requests again after a restart. The
session's tritonserver is the first replica (never killed); the second is this module's,
loaded ahead while the other tiers run (tests/held_servers.py), killed and restarted by the
bench. The measurement runs in-process: the point is the replicas, not the bench's startup."""

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from held_servers import server_fixture
from stacks import EXIT_TIMEOUT_S, stack_launcher, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import replicas_bench  # noqa: E402

REQUESTS = 16


@contextlib.contextmanager
def _second_triton(tmp_path_factory):
    second = stack_launcher.Stack(
        stack_launcher.loopback_config(tiny_checkpoint(), exit_timeout_s=EXIT_TIMEOUT_S)
    )
    try:
        second.start_triton()
        replicas_bench.wait_model_ready([second.config.triton_grpc_url], timeout=240)
        yield second
    finally:
        second.stop()


second_triton = server_fixture("second_triton", _second_triton, scope="module", ahead=True)


def test_two_replicas_spread_fail_over_and_come_back(stack, second_triton):
    first, second = stack.config.triton_grpc_url, second_triton.config.triton_grpc_url
    primary = stack_launcher.Stack(
        stack_launcher.loopback_config(
            tiny_checkpoint(), proxy_args=["--triton-url", f"{first},{second}"]
        )
    )
    try:
        primary.start_proxy()
        primary.wait_ready(timeout=240)
        args = argparse.Namespace(requests=REQUESTS, concurrency=8)
        report = asyncio.run(replicas_bench.measure(primary, second_triton, [first, second], args))
    finally:
        primary.stop()
    assert report["spread"] == {"ok": REQUESTS}
    assert "failed" not in report["failover"]  # nothing failed before it streamed
    assert set(report["ready_during_failover"]) == {200}
    assert report["after_restart"] == {"ok": REQUESTS}
    came_back = report["after_restart_by_upstream"][second].get("ok", 0)
    assert came_back > 0 and report["after_restart_by_upstream"][first].get("ok", 0) > 0
