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


@pytest.fixture(scope="session", autouse=True)
def one_tls_context_for_every_test_client():
    """Every openai, anthropic or httpx client a test makes builds httpx's default TLS context,
    which reads the CA bundle (about 20 ms, 3.5 s of one proxy test file), though every server
    a test talks to is plain http on 127.0.0.1: the session builds each distinct one once."""
    import httpx._transports.default as transport

    build = transport.create_ssl_context
    built = {}

    def once(verify=True, cert=None, trust_env=True):
        if not isinstance(verify, (bool, str)) or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        key = (verify, trust_env)
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    transport.create_ssl_context = once
    yield
    transport.create_ssl_context = build
