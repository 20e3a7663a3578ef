"""bench/proxy_overhead.py runs against the session's stack and reports both overheads."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "proxy_overhead.py"


def test_proxy_overhead_script_prints_both_numbers(stack, tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--proxy-url", stack.config.proxy_url]
        + ["--triton-url", stack.config.triton_grpc_url]
        + ["--requests", "4", "--streams", "2", "--stream-tokens", "8", "--warmup", "1"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "per-request overhead p50:" in result.stdout, result.stdout
    assert "per-chunk overhead p50:" in result.stdout, result.stdout
    report = json.loads(out.read_text())
    assert report["requests"]["proxy"]["n"] == 4 and report["requests"]["direct"]["n"] == 4
    assert report["stream"]["proxy"]["chunks"] > 1 and report["stream"]["direct"]["chunks"] > 1
    for side in ("proxy", "direct"):
        assert report["requests"][side]["p50_ms"] > 0
        assert report["stream"][side]["p50_ms"] > 0
