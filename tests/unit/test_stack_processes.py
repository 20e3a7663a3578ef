"""The launcher (scripts/stack.py, behind scripts/serve) leaves nothing behind and never takes
another server's answer for its own: taken ports are refused before anything starts, a stop
ends whole process groups, and readiness counts only once its own children hold the ports."""

import http.server
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import stack
from helpers import wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux /proc")


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_refuses_a_taken_port_and_says_which(taken_port, tmp_path):
    ports = {flag: str(stack.free_port()) for flag in ("--http-port", "--metrics-port")}
    result = subprocess.run(
        [sys.executable, str(stack.ROOT / "scripts" / "stack.py"), "--host", "127.0.0.1"]
        + ["--model", str(tmp_path / "never-loaded"), "--proxy-port", str(stack.free_port())]
        + ["--grpc-port", str(taken_port), *(a for kv in ports.items() for a in kv)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert (
        f"port {taken_port} (Triton gRPC, --grpc-port) is already in use on 127.0.0.1"
        in result.stderr
    )
    assert "[serve] model:" not in result.stderr  # refused before choosing, let alone starting


def test_a_free_port_is_not_reported_taken(taken_port):
    config = stack.StackConfig(
        model="",
        proxy_port=taken_port,
        http_port=stack.free_port(),
        grpc_port=stack.free_port(),
        metrics_port=stack.free_port(),
    )
    assert config.ports_taken() == [
        f"port {taken_port} (the OpenAI proxy, --proxy-port) is already in use on 127.0.0.1"
    ]


def group_leader(script: str) -> subprocess.Popen:
    """A shell in a session of its own: a stand-in for tritonserver and its stubs."""
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)


def test_ending_a_group_ends_the_children_the_leader_left():
    # The leader exits on SIGTERM as tritonserver does; its child (a stub) does not.
    leader = group_leader("sleep 60 & trap 'exit 0' TERM; while :; do sleep 0.05; done")
    wait_until(lambda: len(stack.group_members(leader.pid)) >= 2, what="the child")
    leader.send_signal(signal.SIGTERM)
    leader.wait(10)
    assert stack.group_members(leader.pid)  # the orphan, still running
    stack.end_process_group(leader)
    assert stack.group_members(leader.pid) == []


def test_stop_ends_both_groups_on_every_path():
    running = stack.Stack(stack.loopback_config("unused"))
    running.triton = group_leader("sleep 60 & trap 'exit 0' TERM; while :; do sleep 0.05; done")
    running.proxy = group_leader("trap '' TERM; sleep 60")  # ignores SIGTERM altogether
    wait_until(lambda: len(stack.group_members(running.triton.pid)) >= 2, what="the child")
    running.stop(timeout=1)
    assert stack.group_members(running.triton.pid) == []
    assert stack.group_members(running.proxy.pid) == []


READY_SERVER = textwrap.dedent(
    """
    import http.server, sys

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready).serve_forever()
    """
)


class _AlwaysReady(http.server.BaseHTTPRequestHandler):
    """Another server on the stack's port, answering 200 to everything."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_readiness_is_read_from_its_own_children_only():
    running = stack.Stack(stack.loopback_config("unused"))
    stranger = http.server.HTTPServer(("127.0.0.1", running.config.proxy_port), _AlwaysReady)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    running.proxy = group_leader("sleep 60")  # started, not listening (yet)
    try:
        with pytest.raises(TimeoutError):  # the stranger's 200 is not this stack's
            running.wait_ready(timeout=1.0)
    finally:
        stranger.shutdown()
        stranger.server_close()
        running.stop(timeout=1)


def test_its_own_proxy_answering_is_ready():
    running = stack.Stack(stack.loopback_config("unused", lazy_load=True))
    port = str(running.config.proxy_port)
    running.proxy = subprocess.Popen(
        [sys.executable, "-c", READY_SERVER, port], start_new_session=True
    )
    try:
        running.wait_ready(timeout=30)
        assert stack.group_listens_on(running.proxy.pid, running.config.proxy_port)
    finally:
        running.stop(timeout=5)


@pytest.mark.parametrize("was_ready", [True, False])
def test_the_model_watch_restarts_a_tritonserver_that_exited_only_after_it_served(
    monkeypatch, tmp_path, was_ready
):
    """A tritonserver that exits by itself (Triton can abort when a model's stub dies) is
    restarted once the stack had been ready; one that never was stops the stack as before."""
    monkeypatch.setattr(stack.model_probe, "WATCH_EVERY_S", 0.01)
    running = stack.Stack(stack.loopback_config(str(tmp_path), log_dir=tmp_path))
    started = []

    def start_triton():
        started.append(running.triton)
        running.triton = subprocess.Popen(["sleep", "60"], start_new_session=True)

    monkeypatch.setattr(running, "start_triton", start_triton)
    running.triton = subprocess.Popen(["true"], start_new_session=True)  # exits at once
    running.proxy = subprocess.Popen(["sleep", "60"], start_new_session=True)
    running._was_ready = was_ready
    try:
        running.start_model_watch()
        wait_until(lambda: started or not running._watch.is_alive(), timeout=10)
        assert running.model_restarts == int(was_ready) and len(started) == int(was_ready)
        if was_ready:
            assert running.running() and running.triton.poll() is None
        else:
            assert not running.running()
    finally:
        running.stop(timeout=5)
