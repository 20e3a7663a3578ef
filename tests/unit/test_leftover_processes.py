"""The suite's check that no server it started outlives it (tests/leftover_processes.py)."""

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import leftover_processes
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux /proc")
SLEEP = shutil.which("sleep")


def fake_server(name: str, token: str) -> subprocess.Popen:
    """A process that looks like `name` (its argv[0]) started by the session `token`."""
    env = {**os.environ, leftover_processes.SESSION_ENV: token}
    return subprocess.Popen([name, "60"], executable=SLEEP, env=env)


def test_only_the_sessions_own_servers_are_leftovers():
    token, other = uuid.uuid4().hex, uuid.uuid4().hex
    ours = fake_server("tritonserver", token)
    theirs = fake_server("tritonserver", other)  # another session's, or a developer's
    helper = fake_server("sleep", token)  # not a server
    try:
        found = leftover_processes.leftovers_after_grace(token, grace_s=0)
        assert [leftover.pid for leftover in found] == [ours.pid]
        assert "tritonserver" in str(found[0])
        leftover_processes.kill(found)
        ours.wait(10)
        assert leftover_processes.leftovers(token) == []
    finally:
        for process in (ours, theirs, helper):
            process.kill()
            process.wait()


LEAKY_TEST = textwrap.dedent(
    """
    import shutil
    import subprocess

    def test_leaves_a_stub_behind():
        subprocess.Popen(["triton_python_backend_stub", "60"], executable=shutil.which("sleep"))
    """
)


def test_a_session_that_leaves_a_server_behind_fails(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    tests_dir = Path(leftover_processes.__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "QWEN_VL_TEST_EXIT_GRACE_S": "0.2"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # none needed; hypothesis alone takes seconds
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "leftover_processes", "-p", "no:cacheprovider"]
        + ["--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 passed" in result.stdout  # the test itself passed: the session check failed it
    assert "servers started by the tests outlived them (now killed)" in result.stdout
    assert "triton_python_backend_stub" in result.stdout


def test_postgres_server_processes_are_watched_under_their_titles():
    token = uuid.uuid4().hex
    # PostgreSQL's server processes retitle themselves; the postmaster keeps its path.
    postmaster = fake_server("/usr/lib/postgresql/15/bin/postgres", token)
    checkpointer = fake_server("postgres: checkpointer ", token)
    try:
        found = leftover_processes.leftovers_after_grace(token, grace_s=0)
        assert sorted(leftover.pid for leftover in found) == sorted(
            [postmaster.pid, checkpointer.pid]
        )
    finally:
        for process in (postmaster, checkpointer):
            process.kill()
            process.wait()


def test_the_sessions_postgres_server_carries_the_session_token(postgres_server):
    token = os.environ[leftover_processes.SESSION_ENV]
    pids = [leftover.pid for leftover in leftover_processes.leftovers(token)]
    assert postgres_server.process.pid in pids
