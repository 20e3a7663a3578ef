"""Fixtures shared by every tier: the tiny checkpoint, and the storage tests' databases
(`database_url` over SQLite and a session's PostgreSQL server, tests/state_fixtures.py).
pytest.ini puts the repository root, scripts/ and the model's helper modules on the path.

The session fails if a server it started outlives it (tests/leftover_processes.py). Servers
that fixtures hold start ahead and stop behind on threads (tests/held_servers.py)."""

import held_servers
import pytest
import stack
from leftover_processes import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (hooks)
from state_fixtures import (  # noqa: F401  (fixtures: both database engines, tests/state_fixtures.py)
    database_url,
    postgres_server,
    postgres_url,
)


def pytest_configure(config):
    config.pluginmanager.register(held_servers, "held_servers")


@pytest.fixture(scope="session")
def tiny_checkpoint_path() -> str:
    """The locally built random-weight Qwen2.5-VL (cached after the first build)."""
    return stack.tiny_checkpoint()
