"""Servers the session's fixtures hold, started ahead and stopped behind on threads (a pytest
plugin: tests/conftest.py registers it), so that no test waits for a model to load or for a
server to exit while other tests could run instead.

    stack = server_fixture("stack", open_stack, scope="session", ahead=True)

makes fixture `stack`, whose value is what `open_stack(tmp_path_factory)` (a context manager:
`with open_stack(tmp_path_factory) as value`) gives. With `ahead`, the server starts on a
thread as soon as collection is over, if a selected test uses the fixture: a tritonserver
loads its model while the tiers before run (pytest.ini runs tests/e2e last). Such starts run
one at a time, in the order of the tests that need them. Whatever the scope, the server is
stopped on a thread right after the last selected test that uses the fixture, while the next
tests run (the fixture's own teardown only begins the stop, if it comes first). The session's
end waits for every stop, before tests/leftover_processes.py looks for leftovers; a stop that
failed fails the run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

Opener = Callable[[pytest.TempPathFactory], contextlib.AbstractContextManager]

# One start at a time, in the order the tests need them: a model load takes most of a core,
# and on 2 cores two at once would slow the tests running meanwhile more than they gain.
_starting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="held-server-start")
# Stops mostly wait (for a tritonserver's exit): several at once.
_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="held-server-stop")
_ahead: dict[str, Opener] = {}  # fixture name -> its opener, for fixtures started ahead
_uses: dict[str, Callable[[pytest.Item], bool]] = {}  # fixture name -> who asks for it by name
_started: dict[str, Future] = {}  # fixture name -> Future[_Held], started ahead, not yet taken
_last_user: dict[str, str] = {}  # fixture name -> node id of the last selected test using it
_holding: dict[str, _Held] = {}  # fixture name -> the server its fixture holds now
_stopping: list[Future] = []


class _Held:
    """One entered server: its value, and its exit (run once, here or on a thread)."""

    def __init__(self, opener: Opener, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._exit = contextlib.ExitStack()
        self.value = self._exit.enter_context(
            opener(tmp_path_factory)
        )  # a failed start left nothing running
        self._stopped: Future | None = None
        self._lock = threading.Lock()

    def stop_behind(self) -> None:
        with self._lock:
            if self._stopped is None:
                self._stopped = _threads.submit(self._exit.close)
                _stopping.append(self._stopped)


def server_fixture(
    name: str,
    opener: Opener,
    *,
    scope: str = "session",
    ahead: bool = False,
    asked_by: Callable[[pytest.Item], bool] | None = None,
):
    """Fixture `name` holding `opener(tmp_path_factory)`'s server (module docstring).
    `asked_by(item)`: whether a test asks for it through `request.getfixturevalue`, which
    its fixture names do not show; the server must not stop before such a test."""
    if ahead:
        _ahead[name] = opener
    if asked_by is not None:
        _uses[name] = asked_by

    @pytest.fixture(scope=scope, name=name)
    def held(request, tmp_path_factory) -> Any:
        future = _started.pop(name, None)
        server = future.result() if future is not None else _Held(opener, tmp_path_factory)
        _holding[name] = server
        request.addfinalizer(server.stop_behind)  # the session's end waits for it
        return server.value

    return held


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or session.testsfailed:
        return  # nothing will run
    first_user: dict[str, int] = {}
    for index, item in enumerate(session.items):
        used = set(getattr(item, "fixturenames", ()))
        used.update(fixture for fixture, asked_by in _uses.items() if asked_by(item))
        for fixture in used:
            first_user.setdefault(fixture, index)
            _last_user[fixture] = item.nodeid
    for name in sorted(set(_ahead) & set(first_user) - set(_started), key=first_user.get):
        # the factory the tmp_path_factory fixture returns
        factory = session.config._tmp_path_factory
        _started[name] = _starting.submit(_Held, _ahead[name], factory)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    for name in [name for name, server in _holding.items() if _last_user.get(name) == item.nodeid]:
        _holding.pop(name).stop_behind()
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Before the leftover check: servers started ahead but never taken (their tests were
    not reached) are stopped, and every stop is waited for; a stop that failed fails the run."""
    for future in _started.values():
        with contextlib.suppress(Exception):  # a start that failed left nothing running
            future.result().stop_behind()
    _started.clear()
    for server in _holding.values():
        server.stop_behind()
    _holding.clear()
    failed = [stop.exception() for stop in _stopping if stop.exception() is not None]
    _stopping.clear()
    if failed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "a server the tests held failed to stop", red=True)
            for error in failed:
                reporter.write_line(repr(error))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
