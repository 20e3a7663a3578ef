"""Fixtures for the proxy tier: the real app, served on loopback, over a scripted backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient
from echo_triton import echo_tritonserver
from fake_triton import FakeTriton
from held_servers import server_fixture
from proxy_fakes import TEST_CONFIG, FakeBackend, serving
from stack import free_port

from proxy.config import with_settings

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client() -> AsyncGenerator[ClientFactory, None]:
    """`await make_client(backend, **settings)`: a test client for a fresh app, its config
    TEST_CONFIG with `settings` (named by flag: `max_images=2`, `image_fetch=False`)."""
    async with contextlib.AsyncExitStack() as servers:

        async def make(backend: FakeBackend | None = None, **settings: object) -> TestClient:
            config = with_settings(TEST_CONFIG, **settings)
            backend = backend if backend is not None else FakeBackend()
            return await servers.enter_async_context(serving(config, backend))

        yield make


def _echo_triton(tmp_path_factory):
    return echo_tritonserver(tmp_path_factory.mktemp("triton"))


# The gRPC url of one real tritonserver serving the echo model, shared by the tier's live tests
# (none of them changes what it serves); started ahead, stopped behind (tests/held_servers.py).
echo_triton_url = server_fixture("echo_triton_url", _echo_triton, ahead=True)


@pytest.fixture
async def fake_triton():
    """The fake Triton gRPC server (fake_triton.py) on a free loopback port."""
    triton = FakeTriton(free_port())
    await triton.start()
    yield triton
    await triton.stop()
