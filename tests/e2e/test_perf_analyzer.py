"""perf_analyzer drives the Triton model directly over gRPC streaming with the shipped inputs."""

import base64
import json
import os
import re
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from stack import free_port

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ROOT / "bench" / "perf_analyzer"
WRAPPER = ROOT / "scripts" / "perf_analyzer"
sys.path.insert(0, str(INPUTS))
import make_inputs  # noqa: E402


def run_script(url: str, output_dir: Path, *flags: str, timeout: float):
    """bench/perf_analyzer/run.py against `url`, without warm-up."""
    return subprocess.run(
        [sys.executable, str(INPUTS / "run.py"), "--url", url, *flags]
        + ["--warmup", "0", "--output-dir", str(output_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def image_tokens_served(stack) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack.config.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    match = re.search(r"^qwen_vl_image_tokens_total\{[^}]*\} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_shipped_inputs_are_what_make_inputs_writes():
    for name, doc in make_inputs.build().items():
        shipped = json.loads((INPUTS / name).read_text(encoding="utf-8"))
        assert shipped == doc, f"{name} is stale: run bench/perf_analyzer/make_inputs.py"


def test_b64_image_is_a_length_prefixed_serialized_bytes_tensor():
    entry = json.loads((INPUTS / "image_b64.json").read_text())["data"][0]["image"]
    blob = base64.b64decode(entry["b64"])
    (length,) = struct.unpack("<I", blob[:4])
    assert entry["shape"] == [1] and length == len(blob) - 4
    assert blob[4:7] == b"\xff\xd8\xff"  # the raw JPEG itself, not base64 text or a data: URL
    assert (
        base64.b64decode(make_inputs.bytes_tensor_b64([b"ab", b"c"]))
        == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    )


# The other two shipped files (text.json, image_b64.json) stream through run.py's perf_analyzer
# in test_run_script_prints_a_table_against_the_stack: every file is streamed once per run.
@pytest.mark.parametrize("inputs", ["image.json", "video.json"])
def test_perf_analyzer_streams_against_the_model(stack, inputs):
    image_tokens_before = image_tokens_served(stack)
    result = subprocess.run(
        [
            str(WRAPPER),
            "-m",
            "qwen2_5_vl",
            "-i",
            "grpc",
            "--streaming",
            "-u",
            stack.config.triton_grpc_url,
            "--input-data",
            str(INPUTS / inputs),
            "--request-count",
            "12",
            "--concurrency-range",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"},  # as a new user's
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    match = re.search(r"Concurrency: 2, throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout[-2000:]
    if inputs.startswith("image"):  # the model decoded the image in every request
        assert image_tokens_served(stack) - image_tokens_before >= 12


def test_run_script_prints_a_table_against_the_stack(stack, tmp_path):
    image_tokens_before = image_tokens_served(stack)
    result = run_script(
        stack.config.triton_grpc_url,
        tmp_path,
        *("--inputs", "text.json", "image_b64.json", "--concurrency", "1", "--request-count", "6"),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.startswith(("text.json", "image_b64.json"))
    }
    assert set(rows) == {"text.json", "image_b64.json"}, result.stdout
    for cells in rows.values():
        assert cells[1] == "1" and cells[2] == "6" and float(cells[3]) > 0, cells
    assert (tmp_path / "results.json").exists()
    # image_b64.json's raw JPEG bytes were decoded by the model in every request
    assert image_tokens_served(stack) - image_tokens_before >= 6


def test_run_script_fails_when_perf_analyzer_fails(tmp_path):
    result = run_script(
        f"127.0.0.1:{free_port()}",
        tmp_path,
        *("--inputs", "text.json", "--concurrency", "1", "--request-count", "2"),
        timeout=120,
    )
    assert result.returncode == 1 and "FAILED" in result.stdout, result.stdout + result.stderr


def test_the_wrapper_runs_perf_analyzer_without_a_manual_step():
    clean = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    result = subprocess.run(
        [str(WRAPPER), "--version"], capture_output=True, text=True, timeout=60, env=clean
    )
    assert result.returncode == 0, result.stderr
    assert "Perf Analyzer Version" in result.stdout + result.stderr
