"""Fixtures for the proxy tier: the real app, served on loopback, over a scripted backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from proxy_fakes import TEST_CONFIG, FakeBackend

from proxy.app import create_app
from proxy.config import with_settings

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client() -> AsyncGenerator[ClientFactory, None]:
    """`await make_client(backend, **settings)`: a test client for a fresh app, its config
    TEST_CONFIG with `settings` (named by flag: `max_images=2`, `image_fetch=False`)."""
    clients: list[TestClient] = []

    async def make(backend: FakeBackend | None = None, **settings: object) -> TestClient:
        config = with_settings(TEST_CONFIG, **settings)
        app = create_app(config, backend if backend is not None else FakeBackend())
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
