"""perf_analyzer drives the Triton model directly over gRPC streaming with the shipped inputs."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def perf_analyzer_env() -> dict:
    import nvidia.cuda_runtime  # libcudart.so.12, which perf_analyzer links even on CPU

    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{lib}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


@pytest.mark.parametrize("inputs", ["text.json", "image.json"])
def test_perf_analyzer_streams_against_the_model(stack, inputs):
    binary = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    assert binary, "perf_analyzer ships in the tritonclient wheel"
    result = subprocess.run(
        [binary, "-m", "qwen2_5_vl", "-i", "grpc", "--streaming", "-u", stack.config.triton_grpc_url,
         "--input-data", str(ROOT / "bench" / "perf_analyzer" / inputs),
         "--request-count", "12", "--concurrency-range", "2"],
        capture_output=True, text=True, timeout=240, env=perf_analyzer_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    match = re.search(r"Concurrency: 2, throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout[-2000:]
