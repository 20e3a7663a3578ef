"""bench/stream_path_bench.py with tiny counts: the flood model (tests/proxy/triton_models/flood)
streams every token asked for, both ways, and each process of the path is found and measured.
Its main() runs in this process (the servers it measures are its subprocesses either way): a
python of its own would only add its imports. Skipped where the nvidia-pytriton wheel (the
tritonserver binary) is absent."""

import json
import sys

import pytest
from stack import ROOT, find_tritonserver

sys.path.insert(0, str(ROOT / "bench"))
import stream_path_bench  # noqa: E402

TOKENS = 40  # past the flood model's cancellation check every 16 tokens


def test_stream_path_bench_measures_both_sides(tmp_path):
    try:
        find_tritonserver()
    except SystemExit:
        pytest.skip("tritonserver binary (nvidia-pytriton wheel) not installed")
    out = tmp_path / "stream-path.json"
    status = stream_path_bench.main(
        ["--concurrency", "1,2", "--tokens", str(TOKENS)]
        + ["--requests", "2", "--rounds", "1", "--warmup", "1", "--proxy-workers", "1"]
        + ["--out", str(out)]
    )
    assert status == 0
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
