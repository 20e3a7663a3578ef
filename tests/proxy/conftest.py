"""Fixtures for the proxy tier: the real app, served on loopback, over a scripted backend."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from proxy_fakes import TEST_CONFIG, FakeBackend

from proxy.app import create_app

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client() -> AsyncGenerator[ClientFactory, None]:
    """`await make_client(backend, **config_overrides)`: a test client for a fresh app."""
    clients: list[TestClient] = []

    async def make(backend: FakeBackend | None = None, **overrides: object) -> TestClient:
        config = dataclasses.replace(TEST_CONFIG, **overrides)
        app = create_app(config, backend if backend is not None else FakeBackend())
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
