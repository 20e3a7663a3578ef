"""The optional API key: required on every route but the probes, decided on the route
aiohttp matched, whatever the path looks like on the wire."""

from __future__ import annotations

import json

import pytest
from hardening_helpers import CHAT, NORMAL_REQUEST, assert_envelope, json_bytes, raw_http
from proxy_fakes import FakeBackend

KEY = "test-key-1234567890"
GOOD = {"Authorization": f"Bearer {KEY}"}


async def test_chat_needs_the_key(make_client):
    client = await make_client(FakeBackend(), api_key=KEY)
    for headers in (
        {},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": "Bearer "},
    ):
        response = await client.post(CHAT, json=NORMAL_REQUEST, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.headers["X-Request-Id"]
        assert_envelope(await response.json(), "invalid_api_key")
    response = await client.post(CHAT, json=NORMAL_REQUEST, headers=GOOD)
    assert response.status == 200
    response = await client.post(
        CHAT, json=NORMAL_REQUEST, headers={"Authorization": f"bearer  {KEY} "}
    )
    assert response.status == 200  # the scheme is case-insensitive, spaces are not the key


async def test_probes_are_open_and_everything_else_is_closed(make_client):
    client = await make_client(FakeBackend(), api_key=KEY)
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status == 200, path
        assert (await client.head(path)).status == 200, path
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/models/qwen2.5-vl-7b-instruct"),
        ("POST", "/health"),  # a probe path with another method is not a probe
        ("GET", "/no/such/route"),  # unknown routes too: nothing to map without the key
        ("OPTIONS", CHAT),
    ):
        response = await client.request(method, path)
        assert response.status == 401, (method, path)
    assert (await client.get("/v1/models", headers=GOOD)).status == 200
    assert (await client.get("/no/such/route", headers=GOOD)).status == 404


async def test_metrics_can_require_the_key(make_client):
    client = await make_client(FakeBackend(), api_key=KEY, metrics_require_auth=True)
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=GOOD)).status == 200
    assert (await client.get("/health")).status == 200


async def test_no_key_configured_means_open(make_client):
    client = await make_client(FakeBackend())
    assert (await client.post(CHAT, json=NORMAL_REQUEST)).status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "//v1/chat/completions",
        "/v1/../v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/chat/completions/",
        "/v1/chat%2Fcompletions",
        "/%76%31/chat/completions",
        "/V1/chat/completions",
        "/health/../v1/chat/completions",
        "/health%2F..%2Fv1/chat/completions",
        "/ready/..%2fv1/chat/completions",
        "/v1/chat/completions;/health",
        "/v1/chat/completions?/health",
        "/v1/chat/completions#/health",
        "http://127.0.0.1/v1/chat/completions",
        "/v1/chat/completions%00/health",
    ],
)
async def test_path_tricks_never_reach_chat_without_the_key(make_client, path):
    backend = FakeBackend()
    client = await make_client(backend, api_key=KEY)
    body = json_bytes(NORMAL_REQUEST)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    status, headers, answer = await raw_http(client.server.port, head.encode() + body)
    # Without the key: 401 (default deny) or aiohttp's own 400 for an unparseable target.
    assert status in (400, 401), (status, answer)
    if status == 401:
        assert_envelope(json.loads(answer), "invalid_api_key")
        assert headers["www-authenticate"].startswith("Bearer")
    assert backend.requests == []  # the model never saw it
    # With the key, whatever the router makes of the path is served or a 404, never a 401.
    head = head.replace("Connection", f"Authorization: Bearer {KEY}\r\nConnection")
    status, _, _ = await raw_http(client.server.port, head.encode() + body)
    assert status in (200, 400, 404, 405)
