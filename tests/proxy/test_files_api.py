"""The Files API (proxy/api/files/routes.py) through the app, with the official `openai` SDK
and raw HTTP: upload, list, retrieve, content, delete in OpenAI's shapes, per tenant, within
the upload limit, and the stateless proxy's answer. On SQLite, and two replicas on one
PostgreSQL (the storage itself is tested on both in tests/unit/test_state_files.py)."""

from __future__ import annotations

import json
import random
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from hardening_helpers import assert_envelope, raw_http
from proxy_fakes import SERVED_MODEL, FakeBackend, script

from proxy.keys import DATABASE_KEY
from proxy.state.blobs import BLOB_CHUNKS, BLOBS
from proxy.state.files import FILES

ALICE, BOB = "alice-key", "bob-key"
LINES = b"".join(
    b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' % i
    for i in range(50)
)


@pytest.fixture
async def files_proxy(make_client, tmp_path):
    """`await files_proxy(**settings)`: (test client, SDK client factory) for an app with
    state in tmp_path and the keys of Alice and Bob."""
    http_clients: list[httpx.AsyncClient] = []

    async def make(**settings: Any):
        settings = {"state": True, "state_dir": str(tmp_path), "api_key": f"{ALICE},{BOB}"} | (
            settings
        )
        server = await make_client(FakeBackend(), **settings)

        def sdk(key: str = ALICE) -> openai.AsyncOpenAI:
            http_clients.append(httpx.AsyncClient(trust_env=False))
            return openai.AsyncOpenAI(
                base_url=str(server.make_url("/v1")),
                api_key=key,
                max_retries=0,
                http_client=http_clients[-1],
            )

        return server, sdk

    yield make
    for client in http_clients:
        await client.aclose()


async def _rows(server, table) -> int:
    async with server.server.app[DATABASE_KEY].begin() as connection:
        return len((await connection.execute(table.select())).all())


def _form(*fields: tuple[str, bytes | str, str | None]) -> aiohttp.FormData:
    """A multipart body with `fields` in this order: (name, value, filename or None)."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value, filename in fields:
        form.add_field(name, value, filename=filename)
    return form


def _assert_error(body: dict, code: str | None, param: str | None) -> None:
    assert assert_envelope(body, code)["param"] == param, body


def _bearer(key: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_sdk_uploads_reads_lists_and_deletes_a_file(files_proxy):
    server, sdk = await files_proxy()
    client = sdk()
    created = await client.files.create(file=("requests.jsonl", LINES), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose) == (
        len(LINES),
        "requests.jsonl",
        "batch",
    )
    assert created.status == "processed"
    assert created.expires_at == created.created_at + 30 * 24 * 3600  # --state-retention-s
    assert await client.files.retrieve(created.id) == created
    assert (await client.files.content(created.id)).read() == LINES
    assert [f.id async for f in client.files.list()] == [created.id]
    deleted = await client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.files.retrieve(created.id)
    assert missing.value.body["message"] == f"No such File object: {created.id}"
    assert [f async for f in client.files.list()] == []


async def test_the_shapes_are_openais_exactly(files_proxy):
    server, _ = await files_proxy()
    form = _form(("purpose", "user_data", None), ("file", b"hello", "note.txt"))
    response = await server.post("/v1/files", data=form, headers=_bearer())
    assert response.status == 200
    body = await response.json()
    assert set(body) == {
        "id",
        "object",
        "bytes",
        "created_at",
        "filename",
        "purpose",
        "status",
        "expires_at",
    }
    assert (body["object"], body["bytes"], body["purpose"], body["status"]) == (
        "file",
        5,
        "user_data",
        "processed",
    )
    assert isinstance(body["created_at"], int) and isinstance(body["expires_at"], int)
    content = await server.get(f"/v1/files/{body['id']}/content", headers=_bearer())
    assert content.headers["Content-Length"] == "5" and await content.read() == b"hello"
    listed = await (await server.get("/v1/files", headers=_bearer())).json()
    assert listed == {
        "object": "list",
        "data": [body],
        "first_id": body["id"],
        "last_id": body["id"],
        "has_more": False,
    }
    deleted = await server.delete(f"/v1/files/{body['id']}", headers=_bearer())
    assert await deleted.json() == {"id": body["id"], "object": "file", "deleted": True}


async def test_the_sdk_pages_through_every_file_with_its_cursor(files_proxy):
    server, sdk = await files_proxy()
    client = sdk()
    made = [
        (await client.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch")).id
        for i in range(5)
    ]
    # The SDK follows has_more with `after` = the last id of each page.
    assert sorted([f.id async for f in client.files.list(limit=2, order="asc")]) == sorted(made)
    first_page = await client.files.list(limit=2)
    assert len(first_page.data) == 2 and first_page.has_more
    only_user_data = await client.files.list(purpose="user_data")
    assert only_user_data.data == []


async def test_another_tenants_file_is_404_like_an_unknown_one(files_proxy):
    server, sdk = await files_proxy()
    alice, bob = sdk(ALICE), sdk(BOB)
    created = await alice.files.create(file=("a.jsonl", LINES), purpose="batch")
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError) as refused:
            await call(created.id)
        assert refused.value.body["message"] == f"No such File object: {created.id}"
    with pytest.raises(openai.NotFoundError) as unknown:
        await bob.files.retrieve("file-0000")
    assert unknown.value.status_code == 404 and unknown.value.body["param"] == "file_id"
    assert [f async for f in bob.files.list()] == []
    assert (await alice.files.retrieve(created.id)).id == created.id
    with pytest.raises(openai.AuthenticationError):
        await sdk("mallory-key").files.list()


async def test_the_purpose_may_follow_the_file_and_expiry_may_be_shorter(files_proxy):
    server, sdk = await files_proxy()
    form = _form(
        ("file", LINES, "late-purpose.jsonl"),
        ("purpose", "batch", None),
        ("expires_after[anchor]", "created_at", None),
        ("expires_after[seconds]", "3600", None),
    )
    response = await server.post("/v1/files", data=form, headers=_bearer())
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["purpose"] == "batch" and body["expires_at"] == body["created_at"] + 3600
    expiring = await sdk().files.create(
        file=("e.jsonl", b"{}\n"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert expiring.expires_at == expiring.created_at + 7200


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ([("purpose", "fine-tune", None), ("file", b"x", "f")], "purpose", "invalid_value"),
        ([("file", b"x", "f"), ("purpose", "nonsense", None)], "purpose", "invalid_value"),
        ([("file", b"x", "f")], "purpose", "missing_required_parameter"),
        ([("purpose", "batch", None)], "file", "missing_required_parameter"),
        (
            [("purpose", "batch", None), ("file", b"x", "f"), ("file", b"y", "g")],
            "file",
            "invalid_value",
        ),
        ([("purpose", "b" * 2000, None), ("file", b"x", "f")], "purpose", "invalid_value"),
        (
            [
                ("purpose", "batch", None),
                ("file", b"x", "f"),
                ("expires_after[anchor]", "created_at", None),
                ("expires_after[seconds]", "60", None),
            ],
            "expires_after[seconds]",
            "invalid_value",
        ),
        (
            [
                ("purpose", "batch", None),
                ("file", b"x", "f"),
                ("expires_after[seconds]", "3600", None),
            ],
            "expires_after[anchor]",
            "invalid_value",
        ),
    ],
)
async def test_bad_uploads_are_400_naming_the_field(files_proxy, fields, param, code):
    server, _ = await files_proxy()
    response = await server.post("/v1/files", data=_form(*fields), headers=_bearer())
    assert response.status == 400
    _assert_error(await response.json(), code, param)
    assert await _rows(server, FILES) == 0


async def test_a_body_that_is_not_multipart_is_400(files_proxy):
    server, _ = await files_proxy()
    response = await server.post("/v1/files", json={"purpose": "batch"}, headers=_bearer())
    assert response.status == 400
    assert "multipart/form-data" in (await response.json())["error"]["message"]


@pytest.mark.parametrize(
    "query, param",
    [("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order"), ("after=file-1", "after")],
)
async def test_bad_list_parameters_are_400_naming_them(files_proxy, query, param):
    server, _ = await files_proxy()
    response = await server.get(f"/v1/files?{query}", headers=_bearer())
    assert response.status == 400
    _assert_error(await response.json(), "invalid_value", param)


async def _chunked(data: bytes, size: int = 4096):
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("declared_length", [True, False])
async def test_an_upload_over_the_limit_is_413_and_leaves_no_blob(files_proxy, declared_length):
    """Refused unread when its Content-Length says so, else while it streams: either way no
    file, no blob and no chunk is left."""
    server, _ = await files_proxy(file_max_bytes=10_000)
    data = random.Random(5).randbytes(200_000)
    for size in (10_001, len(data)):  # just over the limit (streamed), far over (declared)
        form = _form(("purpose", "batch", None), ("file", data[:size], "big.jsonl"))
        body = form()
        if declared_length:
            payload: Any = await _read_all(body)
        else:  # chunked: the limit can only be found while reading
            payload = _chunked(await _read_all(body))
        response = await server.post(
            "/v1/files",
            data=payload,
            headers={**_bearer(), "Content-Type": body.content_type},
        )
        assert response.status == 413, await response.text()
        _assert_error(await response.json(), "file_too_large", "file")
        assert "10000 bytes" in (await response.json())["error"]["message"]
    assert [await _rows(server, table) for table in (FILES, BLOBS, BLOB_CHUNKS)] == [0, 0, 0]
    within = await server.post(
        "/v1/files",
        data=_form(("purpose", "batch", None), ("file", data[:10_000], "ok.jsonl")),
        headers=_bearer(),
    )
    assert within.status == 200  # exactly the limit is accepted


async def test_an_upload_that_stalls_is_408_and_leaves_no_blob(files_proxy):
    """Each read of the body has --request-body-timeout-s: a client that sends part of the
    file and then nothing cannot hold the upload (and its partial blob) open."""
    server, _ = await files_proxy(request_body_timeout_s=0.3)
    form = _form(("purpose", "batch", None), ("file", b"x" * 100_000, "slow.jsonl"))()
    body = await _read_all(form)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Type: {form.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    status, _, answer = await raw_http(server.server.port, head + body[: len(body) // 2])
    assert status == 408
    assert_envelope(json.loads(answer), "request_timeout")
    assert [await _rows(server, table) for table in (FILES, BLOBS, BLOB_CHUNKS)] == [0, 0, 0]


async def _read_all(payload) -> bytes:
    class Sink:
        def __init__(self):
            self.data = bytearray()

        async def write(self, chunk):
            self.data += chunk

    sink = Sink()
    await payload.write(sink)
    return bytes(sink.data)


async def test_the_stateless_proxy_answers_501_and_still_serves_chat(make_client):
    backend = FakeBackend(script("po", "ng"))
    server = await make_client(backend, state=False)
    for method, path in (
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", "/v1/files/file-1"),
        ("GET", "/v1/files/file-1/content"),
        ("DELETE", "/v1/files/file-1"),
    ):
        response = await server.request(method, path, data=_form(("purpose", "batch", None)))
        assert response.status == 501, path
        assert_envelope(await response.json(), "state_disabled")
        assert "--no-state" in (await response.json())["error"]["message"]
    chat = await server.post(
        "/v1/chat/completions",
        json={"model": SERVED_MODEL, "messages": [{"role": "user", "content": "ping"}]},
    )
    assert chat.status == 200
    assert (await chat.json())["choices"][0]["message"]["content"] == "pong"
    assert DATABASE_KEY not in server.server.app


async def test_the_state_lives_in_one_sqlite_file_under_the_state_dir(files_proxy, tmp_path):
    server, sdk = await files_proxy()
    await sdk().files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert (tmp_path / "state.sqlite3").is_file()
    assert server.server.app[DATABASE_KEY].dialect == "sqlite"


async def test_replicas_on_one_postgresql_share_files_per_tenant(files_proxy, postgres_url):
    """Two apps (two replicas) on one database: what one stores the other serves."""
    first, sdk_first = await files_proxy(database_url=postgres_url)
    second, sdk_second = await files_proxy(database_url=postgres_url)
    assert first.server.app[DATABASE_KEY].dialect == "postgresql"
    created = await sdk_first(ALICE).files.create(file=("a.jsonl", LINES), purpose="batch")
    assert (await sdk_second(ALICE).files.content(created.id)).read() == LINES
    with pytest.raises(openai.NotFoundError):
        await sdk_second(BOB).files.retrieve(created.id)
    assert (await sdk_second(ALICE).files.delete(created.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await sdk_first(ALICE).files.retrieve(created.id)
