"""bench/stream_path_bench.py with tiny counts: the flood model (tests/proxy/triton_models/flood)
streams every token asked for, both ways, and each process of the path is found and measured.
Skipped where the nvidia-pytriton wheel (the tritonserver binary) is absent."""

import json
import subprocess
import sys

import pytest
from stack import ROOT, find_tritonserver

SCRIPT = ROOT / "bench" / "stream_path_bench.py"
TOKENS = 40  # past the flood model's cancellation check every 16 tokens


def test_stream_path_bench_measures_both_sides(tmp_path):
    try:
        find_tritonserver()
    except SystemExit:
        pytest.skip("tritonserver binary (nvidia-pytriton wheel) not installed")
    out = tmp_path / "stream-path.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--concurrency", "1,2", "--tokens", str(TOKENS)]
        + ["--requests", "2", "--rounds", "1", "--warmup", "1", "--proxy-workers", "1"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    pids = report["pids"]  # each process of the path was found, so its CPU time is counted
    assert all(pids[name] for name in ("tritonserver", "stub", "proxy 1w", "client")), pids
    runs = report["runs"]
    assert [(run["concurrency"], run["side"]) for run in runs] == [
        (1, "direct"),
        (1, "proxy 1w"),
        (2, "direct"),
        (2, "proxy 1w"),
    ]
    for run in runs:
        assert run["tokens"] == run["streams"] * TOKENS  # every token, through either side
