"""A real tritonserver (the nvidia-pytriton wheel's) serving the echo model of
tests/proxy/triton_models on loopback, for the proxy tier's live tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from helpers import wait_until
from stack import end_process_group, free_port, pytriton_home

ECHO_MODEL_DIR = Path(__file__).parent / "triton_models" / "echo"
STARTUP_TIMEOUT_S = 60


def _backend_dir(server_dir: Path, root: Path) -> Path:
    """A backends/ folder with the Python backend and the stub for this interpreter."""
    python_dir = root / "backends" / "python"
    python_dir.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(server_dir / "backends" / "python" / name, python_dir)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(
        server_dir / "python_backend_stubs" / version / "triton_python_backend_stub", python_dir
    )
    return root / "backends"


def echo_server_command(server_dir: Path, root: Path) -> list[str]:
    """tritonserver over a copy of the echo model under `root` (ports and the rest: the
    caller's flags)."""
    shutil.copytree(ECHO_MODEL_DIR, root / "models" / "echo")
    return [
        str(server_dir / "bin" / "tritonserver"),
        f"--model-repository={root / 'models'}",
        f"--backend-directory={_backend_dir(server_dir, root)}",
    ]


def echo_server_env(server_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stub finds its Python through PATH, and its bundled libs through the wheel's libs dir.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = server_dir.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


@contextlib.contextmanager
def echo_tritonserver(root: Path, *extra_args: str, ready_model: str | None = "echo"):
    """A tritonserver with the echo model on loopback; yields its gRPC url."""
    server_dir = pytriton_home()
    if server_dir is None:
        pytest.skip("tritonserver binary (nvidia-pytriton wheel) not installed")
    port = free_port()
    log_path = root / "tritonserver.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                *echo_server_command(server_dir, root),
                "--allow-http=false",
                "--allow-metrics=false",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={port}",
                "--exit-timeout-secs=2",
                "--disable-auto-complete-config",  # the config is complete: one stub, not two
                *extra_args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=echo_server_env(server_dir),
            start_new_session=True,  # its stubs join its process group, ended with it
        )
    url = f"127.0.0.1:{port}"
    try:
        _wait_until_ready(url, process, log_path, ready_model)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        end_process_group(process)


def _wait_until_ready(
    url: str, process: subprocess.Popen, log_path: Path, model: str | None
) -> None:
    """Until `model` is ready (None: until the server is)."""
    client = grpcclient.InferenceServerClient(url)

    def ready() -> bool:
        assert process.poll() is None, "tritonserver exited"
        try:
            return client.is_model_ready(model) if model else client.is_server_ready()
        except Exception:
            return False

    try:
        wait_until(ready, timeout=STARTUP_TIMEOUT_S, what="tritonserver", step=0.2)
    except AssertionError as failed:
        pytest.fail(f"{failed}; its log:\n" + log_path.read_text()[-3000:])
    finally:
        client.close()
