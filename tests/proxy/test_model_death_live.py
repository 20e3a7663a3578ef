"""The model's process dies under load (its Python-backend stub SIGKILLed, as the OOM killer
does) on a real tritonserver serving the echo model, a server of this module's own.

Triton 2.51 never answers the requests the dead stub held, and its own readiness stays true:
the proxy's liveness watchdog (proxy/transport/liveness.py) ends the open streams with 503
`backend_unavailable`, readiness turns false, new requests get the same retryable 503, and
over replicas the dead one is marked down and the request served by another. The model
image's launcher (docker/triton_launch.py) ends a tritonserver whose model died.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from echo_triton import echo_server_command, echo_server_env, echo_tritonserver
from helpers import wait_until
from stack import ROOT, end_process_group, free_port, model_probe, pytriton_home

from proxy.errors import APIError
from proxy.transport.backend import TritonBackend, TritonRequest
from proxy.transport.upstreams import Upstreams, parse_targets

# Each stream talks for far longer than the test runs (300 words, 50 ms apart).
LONG_TEXT = " ".join(f"w{i}" for i in range(300))
# Generous: without the watchdog nothing ever ends these streams (no proxy idle timeout here).
ENDED_WITHIN_S = 30


def request(text: str = LONG_TEXT) -> TritonRequest:
    return TritonRequest(
        model="echo",
        messages_json=json.dumps([{"role": "user", "content": text}]),
        media={},
        sampling_parameters={"max_tokens": 8, "echo_delay_s": 0.05},
        stream=True,
    )


def stub_pids(root: Path) -> list[int]:
    """The Python-backend stubs whose model lies under `root` (this module's server's)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and str(root).encode() in argv[1]:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def doomed_triton(tmp_path_factory):
    """(gRPC url, root) of a tritonserver whose model the tests kill."""
    root = tmp_path_factory.mktemp("triton-doomed")
    with echo_tritonserver(root) as url:
        yield url, root


async def first_then_rest(backend, request_id: str, started: asyncio.Event):
    """Reads one stream to its end; returns the error it ended with (None: it completed)."""
    try:
        async for _ in backend.generate(request(), request_id):
            started.set()
    except APIError as error:
        started.set()
        return error
    return None


async def test_streams_end_and_readiness_falls_when_the_stub_dies(doomed_triton, echo_triton_url):
    url, root = doomed_triton
    backend = TritonBackend(url)
    try:
        assert await backend.is_ready("echo")
        # One stream is in the stub; the echo model answers one request at a time, so the
        # other two wait in Triton's queue.
        started = [asyncio.Event() for _ in range(3)]
        streams = [
            asyncio.create_task(first_then_rest(backend, f"doomed-{i}", started[i]))
            for i in range(3)
        ]
        await asyncio.wait_for(started[0].wait(), 30)
        (stub,) = stub_pids(root)
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()
        errors = await asyncio.wait_for(asyncio.gather(*streams), ENDED_WITHIN_S)
        print(f"streams ended {time.monotonic() - killed:.2f} s after the stub died")
        for error in errors:
            assert error is not None, "a stream completed on a dead model"
            assert (error.status, error.code) == (503, "backend_unavailable")
            assert error.headers["Retry-After"] == "1"
            assert "Stub" not in error.message and "echo_0" not in error.message

        assert not await backend.is_ready("echo")
        with pytest.raises(APIError) as refused:
            [chunk async for chunk in backend.generate(request("hi"), "after-death")]
        assert (refused.value.status, refused.value.code) == (503, "backend_unavailable")
    finally:
        await backend.close()

    # Over replicas, the dead one fails before the first token: marked down, served by the
    # other, and never asked again while it is down.
    # (A clock that stands still: the mark-down does not expire while the test runs.)
    upstreams = Upstreams(
        parse_targets(f"{url},{echo_triton_url}"), resolve_every_s=0, clock=lambda: 1000.0
    )
    try:
        await upstreams.refresh()
        dead = next(u for u in upstreams.upstreams if u.address == url)
        for attempt in range(3):
            text = "".join([c.text async for c in upstreams.generate(request("hi"), f"r{attempt}")])
            assert text.endswith("hi")
        assert dead.failures == 1 and dead.requests == 1
        assert await upstreams.is_ready("echo")  # the live replica serves
    finally:
        await upstreams.close()


def test_the_launchers_watch_ends_a_tritonserver_whose_model_died(tmp_path):
    """docker/triton_launch.py (the model image's command) forks the model watch and execs
    tritonserver; when the model's stub dies the watch ends tritonserver, so the container's
    restart policy starts a fresh one."""
    server_dir = pytriton_home()
    if server_dir is None:
        pytest.skip("tritonserver binary (nvidia-pytriton wheel) not installed")
    http_port = free_port()
    command = [
        sys.executable,
        str(ROOT / "docker" / "triton_launch.py"),
        *echo_server_command(server_dir, tmp_path),
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={free_port()}",
        "--allow-metrics=false",
        "--exit-timeout-secs=2",
        "--disable-auto-complete-config",
    ]
    env = {**echo_server_env(server_dir), "TRITON_WATCH_MODEL": "echo"}
    with open(tmp_path / "tritonserver.log", "wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: model_probe.ask(url, "echo"), timeout=60, what="the echo model")
        (stub,) = stub_pids(tmp_path)
        os.kill(stub, signal.SIGKILL)
        assert server.wait(timeout=60) == -signal.SIGKILL
        assert "model echo died" in (tmp_path / "tritonserver.log").read_text()
    finally:
        end_process_group(server)
