"""The storage tests' databases (a pytest plugin: tests/conftest.py takes its fixtures).

`database_url` is parametrized over both engines the proxy speaks, so every storage test runs
on SQLite (a file in the test's tmp_path) and on PostgreSQL (a real server, never a mock).

The PostgreSQL server is started once per session, on the first test that needs it: initdb
into a fresh directory, then `postgres` in the foreground as this session's child, on
127.0.0.1 and a free port (Debian's package, installed by scripts/setup). Each test gets its
own empty database (CREATE DATABASE costs a few ms), dropped after it. The server is stopped
when the session ends, whatever happened; it carries the session's token, so the suite's
leftover check (tests/leftover_processes.py) fails the run if it outlives the session.

PostgreSQL refuses to run as root: as root the server runs as the `postgres` user. When it
cannot start, every PostgreSQL test fails with the reason: the tier must prove itself, a skip
would hide that it never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from held_servers import server_fixture

from proxy.state.db import sqlite_url

# Where Debian's packages put the server binaries (one directory per major version).
DEBIAN_PG_BINARIES = "/usr/lib/postgresql/*/bin"
PG_BIN_ENV = "QWEN_VL_TEST_PG_BIN"  # a directory holding initdb and postgres, to override
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# The server only serves throwaway test databases: durability is not worth the fsyncs.
_SERVER_OPTIONS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)
ENGINES = ("sqlite", "postgresql")
_BINARIES = ("initdb", "postgres")


class PostgresUnavailable(RuntimeError):
    """The test server could not be started (the reason is the message)."""


def postgres_binaries() -> Path:
    """The directory holding initdb and postgres: $QWEN_VL_TEST_PG_BIN, Debian's newest, or
    the one on PATH."""
    if os.environ.get(PG_BIN_ENV):
        found = Path(os.environ[PG_BIN_ENV])
    else:
        debian = sorted(glob.glob(DEBIAN_PG_BINARIES), key=lambda path: Path(path).parent.name)
        on_path = shutil.which("initdb")
        found = Path(debian[-1]) if debian else Path(on_path).parent if on_path else None
    if found is None or not all(os.access(found / name, os.X_OK) for name in _BINARIES):
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries ({', '.join(_BINARIES)}) in {found or 'any place'}: "
            f"run scripts/setup, which installs Debian's postgresql, or set {PG_BIN_ENV}"
        )
    return found


def _memory_backed_dir() -> str | None:
    """/dev/shm when there is one: on a disk, CREATE DATABASE copies its template at about
    200 ms a test; in memory about 20 ms. None: the usual temporary directory."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """One running test server; `database()` makes a fresh database on it."""

    directory: Path
    port: int
    process: subprocess.Popen
    user: str = "postgres"
    version: int = 0  # server_version_num, e.g. 150018

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        # FILE_COPY (PostgreSQL 15+) copies the template's files instead of writing them
        # through the WAL: a few times faster for the empty databases tests use.
        strategy = " STRATEGY FILE_COPY" if self.version >= 150000 else ""
        _admin(self.url("postgres"), f'CREATE DATABASE "{name}" TEMPLATE template0{strategy}')
        return name

    def drop_database(self, name: str) -> None:
        _admin(self.url("postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; reaped either way.
        The server's children notice their postmaster's end and exit by themselves."""
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                self.process.send_signal(signum)
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()


def _admin(url: str, statement: str) -> object:
    """Runs one statement outside a transaction (CREATE/DROP DATABASE need that) and returns
    its first value, on a thread of its own so it works whether or not the caller runs an
    event loop."""
    import asyncpg

    result: list[object] = []
    failure: list[BaseException] = []

    async def run() -> None:
        connection = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
        try:
            result.append(await connection.fetchval(statement))
        finally:
            await connection.close()

    def target() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _run_as(owner: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run a command as `owner` (None: as this process)."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def start_postgres() -> PostgresServer:
    """initdb and start a server; PostgresUnavailable with the reason (and its log) if not."""
    binaries = postgres_binaries()
    # PostgreSQL refuses root; its files must then belong to the user it runs as, in a
    # directory that user can reach (pytest's own tmp directories are private to root).
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root and there is no postgres user to run the server as (Debian's "
                "postgresql package creates it: run scripts/setup)"
            ) from None
    directory = Path(tempfile.mkdtemp(prefix="qwen-vl-test-pg-", dir=_memory_backed_dir()))
    try:
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        return _initdb_and_start(binaries, owner, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _initdb_and_start(
    binaries: Path, owner: pwd.struct_passwd | None, directory: Path
) -> PostgresServer:
    data = directory / "data"
    as_owner = _run_as(owner)
    user = "postgres"
    initdb = subprocess.run(
        [
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            user,
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **as_owner,
    )
    if initdb.returncode != 0:
        raise PostgresUnavailable(f"initdb failed ({initdb.returncode}): {initdb.stdout[-2000:]}")
    last_error = ""
    for _attempt in range(3):  # another process may take the free port before the server
        port = _free_port()
        log_path = directory / f"postgres-{port}.log"
        with open(log_path, "wb") as log:
            if owner is not None:
                os.chown(log_path, owner.pw_uid, owner.pw_gid)
            options = [arg for option in _SERVER_OPTIONS for arg in ("-c", option)]
            process = subprocess.Popen(
                [
                    str(binaries / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(directory),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    *options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the test run is the fixture's to handle
                **as_owner,
            )
        server = PostgresServer(directory, port, process, user)
        try:
            problem = _wait_ready(server)
        except BaseException:
            server.stop()
            raise
        if problem is None:
            return server
        server.stop()
        last_error = f"{problem}; its log: {log_path.read_text(errors='replace')[-2000:]}"
    raise PostgresUnavailable(f"postgres did not start: {last_error}")


def _wait_ready(server: PostgresServer) -> str | None:
    """None once the server answers a query; otherwise why not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    error: BaseException | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"it exited with {server.process.returncode}"
        try:
            server.version = int(_admin(server.url("postgres"), "SHOW server_version_num"))
            return None
        except Exception as exc:  # noqa: BLE001  (still starting: connection refused)
            error = exc
            time.sleep(0.1)
    return f"no answer within {START_TIMEOUT_S:g} s ({error!r})"


@contextlib.contextmanager
def _postgres_server(tmp_path_factory):
    """One PostgreSQL server for the session; a failure to start fails every test using it."""
    try:
        server = start_postgres()
    except (PostgresUnavailable, OSError) as exc:
        reason = str(exc)
    else:
        reason = ""
    if reason:
        pytest.fail(f"the PostgreSQL test server could not start: {reason}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def _on_postgresql(item: pytest.Item) -> bool:
    """A test of `database_url`'s PostgreSQL case (which asks for the server by name)."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("database_url") == "postgresql"


# Started ahead when a selected test needs it, stopped behind after the last that does
# (tests/held_servers.py).
postgres_server = server_fixture(
    "postgres_server", _postgres_server, ahead=True, asked_by=_on_postgresql
)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=ENGINES)
def database_url(request, tmp_path):
    """An empty database on each engine: `sqlite:///…` in tmp_path, then `postgresql://…` on
    the session's server (started on first use)."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield request.getfixturevalue("postgres_url")
