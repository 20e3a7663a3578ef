"""The suite's check that no server it started outlives it (a pytest plugin: tests/conftest.py
takes its hooks).

The session marks its environment with a token that every process the tests start inherits
(tritonserver hands its environment to the Python-backend stubs). When the session ends, a
`tritonserver`, `triton_python_backend_stub`, `postgres` or proxy still carrying the token is
a leak: it is reported, killed, and the run fails. Processes without the token (a developer's own
server, another session's) are never touched.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SESSION_ENV = "QWEN_VL_TEST_SESSION"
# The programs a test may start that must be gone when the suite ends (postgres: the
# storage tests' server, tests/state_fixtures.py).
WATCHED_PROGRAMS = ("tritonserver", "triton_python_backend_stub", "postgres")
WATCHED_MODULE = "proxy"  # `python -m proxy`
# PostgreSQL's server processes rename themselves "postgres: checkpointer" and so on.
WATCHED_TITLE_PREFIXES = ("postgres: ",)
# Seconds a process may still take to exit after its test stopped it; the launcher already
# waits for every process group it ends, so this only covers servers ended some other way.
EXIT_GRACE_S = float(os.environ.get("QWEN_VL_TEST_EXIT_GRACE_S", "5"))
SESSION_TOKEN = pytest.StashKey[str]()


@dataclass(frozen=True)
class Leftover:
    pid: int
    ppid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}): {self.command}"


def _watched(argv: list[str]) -> bool:
    if not argv:
        return False
    if Path(argv[0]).name in WATCHED_PROGRAMS or argv[0].startswith(WATCHED_TITLE_PREFIXES):
        return True
    return argv[1:3] == ["-m", WATCHED_MODULE]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return b""


def _parent_and_state(proc: Path) -> tuple[int, str]:
    stat = _read(proc / "stat").decode(errors="replace")
    fields = stat[stat.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
    return (int(fields[1]), fields[0]) if len(fields) > 1 else (0, "")


def leftovers(token: str) -> list[Leftover]:
    """The watched processes alive now whose environment carries `token` (Linux /proc)."""
    marker = f"{SESSION_ENV}={token}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if marker not in _read(proc / "environ").split(b"\0"):
            continue
        argv = [a.decode(errors="replace") for a in _read(proc / "cmdline").split(b"\0") if a]
        ppid, state = _parent_and_state(proc)
        if _watched(argv) and state not in ("Z", "X", ""):
            found.append(Leftover(int(proc.name), ppid, " ".join(argv)[:200]))
    return found


def leftovers_after_grace(token: str, grace_s: float = EXIT_GRACE_S) -> list[Leftover]:
    """`leftovers` once they are all gone or `grace_s` has passed."""
    deadline = time.monotonic() + grace_s
    found = leftovers(token)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = leftovers(token)
    return found


def kill(found: list[Leftover]) -> None:
    for leftover in found:
        try:
            os.kill(leftover.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: its controller checks
        return
    token = uuid.uuid4().hex
    session.config.stash[SESSION_TOKEN] = token
    os.environ[SESSION_ENV] = token  # inherited by everything the tests start


def pytest_sessionfinish(session, exitstatus):
    token = session.config.stash.get(SESSION_TOKEN, None)
    found = leftovers_after_grace(token) if token else []
    if not found:
        return
    kill(found)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "servers started by the tests outlived them (now killed)", red=True)
        for leftover in found:
            reporter.write_line(str(leftover))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
