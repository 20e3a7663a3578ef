"""Two real tritonservers (tiny checkpoint) behind one proxy, through bench/replicas_bench.py:
both take requests, a replica killed mid-load fails no request that had not started
streaming while /ready stays 200, and it takes requests again after a restart. The session's
tritonserver is the first replica (never killed); the bench starts and kills the second."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_replicas_spread_fail_over_and_come_back(stack, tmp_path):
    out = tmp_path / "replicas.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/replicas_bench.py"),
            "--requests",
            "16",
            "--first-triton",
            stack.config.triton_grpc_url,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    first, second = report["upstreams"]["first"], report["upstreams"]["second"]
    assert report["spread"] == {"ok": 16}
    assert "failed" not in report["failover"]  # nothing failed before it streamed
    assert set(report["ready_during_failover"]) == {"200"}
    assert report["after_restart"] == {"ok": 16}
    came_back = report["after_restart_by_upstream"][second].get("ok", 0)
    assert came_back > 0 and report["after_restart_by_upstream"][first].get("ok", 0) > 0
