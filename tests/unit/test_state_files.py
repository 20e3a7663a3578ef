"""Stored files (proxy/state/files.py) on SQLite and PostgreSQL (`database_url`): created from
a stream, listed a page at a time, scoped to their tenant, deleted and expired."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.state import files as files_module
from proxy.state.blobs import BLOBS, BlobStore, BlobTooLarge
from proxy.state.context import sweep
from proxy.state.db import Database
from proxy.state.files import FileStore, UnknownCursor
from proxy.state.settings import StateSettings

ALICE, BOB = "tenant-alice", "tenant-bob"


class Clock:
    """The files' clock, moved by the test (one second per file unless told)."""

    def __init__(self, start: float = 1_000_000.0):
        self.at = start

    def __call__(self) -> float:
        return self.at


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(files_module, "now", clock)
    return clock


def _run(database_url, body, **settings):
    async def main():
        database = await Database.open(database_url)
        try:
            blobs = BlobStore(database, chunk_bytes=1000)
            store = FileStore(database, blobs, StateSettings(**settings))
            return await body(store, database)
        finally:
            await database.close()

    return asyncio.run(main())


async def _pieces(data: bytes, size: int = 700):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _count(database, table) -> int:
    async with database.begin() as connection:
        return len((await connection.execute(table.select())).all())


def test_a_file_round_trips_in_chunks(database_url, clock):
    data = random.Random(3).randbytes(4321)

    async def body(store, database):
        stored = await store.create_from_stream(ALICE, "batch", "in.jsonl", _pieces(data))
        assert stored.id.startswith("file-") and stored.bytes == len(data)
        assert stored.to_openai() == {
            "id": stored.id,
            "object": "file",
            "bytes": 4321,
            "created_at": 1_000_000,
            "filename": "in.jsonl",
            "purpose": "batch",
            "status": "processed",
            "expires_at": 1_000_000 + 30 * 24 * 3600,
        }
        assert await store.get(ALICE, stored.id) == stored
        chunks = [chunk async for chunk in store.content(stored)]
        assert b"".join(chunks) == data and max(map(len, chunks)) == 1000

    _run(database_url, body)


def test_another_tenants_file_is_unknown(database_url, clock):
    async def body(store, database):
        stored = await store.create_from_stream(ALICE, "batch", "a.jsonl", _pieces(b"{}\n"))
        assert await store.get(BOB, stored.id) is None
        assert (await store.list(BOB)).data == []
        assert await store.delete(BOB, stored.id) is False
        with pytest.raises(UnknownCursor):
            await store.list(BOB, after=stored.id)
        assert await store.get(ALICE, stored.id) == stored  # still there for its owner

    _run(database_url, body)


def test_pages_in_both_orders_with_a_cursor_and_a_purpose(database_url, clock):
    async def body(store, database):
        made = []
        for index in range(5):
            clock.at += 1
            purpose = "user_data" if index == 2 else "batch"
            made.append(
                await store.create_from_stream(ALICE, purpose, f"{index}.jsonl", _pieces(b"x"))
            )
        ids = [stored.id for stored in made]
        newest_first = await store.list(ALICE, limit=2)
        assert [f.id for f in newest_first.data] == [ids[4], ids[3]] and newest_first.has_more
        page = newest_first.to_openai()
        assert (page["object"], page["first_id"], page["last_id"]) == ("list", ids[4], ids[3])
        rest = await store.list(ALICE, limit=10, after=ids[3])
        assert [f.id for f in rest.data] == [ids[2], ids[1], ids[0]] and not rest.has_more
        oldest_first = await store.list(ALICE, order="asc", limit=3, after=ids[0])
        assert [f.id for f in oldest_first.data] == ids[1:4] and oldest_first.has_more
        batch = await store.list(ALICE, purpose="batch", order="asc")
        assert [f.id for f in batch.data] == [ids[0], ids[1], ids[3], ids[4]]
        empty = (await store.list(ALICE, order="asc", after=ids[4])).to_openai()
        assert empty == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": False,
        }

    _run(database_url, body)


def test_files_created_in_the_same_instant_page_by_id(database_url, clock):
    async def body(store, database):
        ids = [
            (await store.create_from_stream(ALICE, "batch", "same", _pieces(b"y"))).id
            for _ in range(4)
        ]
        seen, after = [], None
        while True:
            page = await store.list(ALICE, limit=1, after=after, order="asc")
            seen += [f.id for f in page.data]
            if not page.has_more:
                break
            after = page.data[-1].id
        assert seen == sorted(ids)

    _run(database_url, body)


def test_deleting_a_file_frees_its_blob_at_the_sweep_unless_shared(database_url, clock):
    async def body(store, database):
        first = await store.create_from_stream(ALICE, "batch", "a", _pieces(b"same bytes"))
        second = await store.create_from_stream(BOB, "batch", "b", _pieces(b"same bytes"))
        assert first.digest == second.digest and await _count(database, BLOBS) == 1
        assert await store.delete(ALICE, first.id) is True
        assert await store.get(ALICE, first.id) is None
        assert await store.delete(ALICE, first.id) is False  # once
        assert await store.blobs.sweep(grace_s=-1) == 0  # Bob's file still names it
        assert await store.delete(BOB, second.id) is True
        assert await store.blobs.sweep(grace_s=-1) == 1
        assert await _count(database, BLOBS) == 0

    _run(database_url, body)


def test_expired_files_are_never_served_and_the_sweep_deletes_them(database_url, clock):
    async def body(store, database):
        short = await store.create_from_stream(ALICE, "batch", "s", _pieces(b"1"), ttl_s=10)
        kept = await store.create_from_stream(ALICE, "batch", "k", _pieces(b"2"))
        assert short.expires_at == clock.at + 10 and kept.expires_at == clock.at + 100
        clock.at += 10  # expiry is the first instant the file is gone
        assert await store.get(ALICE, short.id) is None
        assert [f.id for f in (await store.list(ALICE)).data] == [kept.id]
        assert await store.delete(ALICE, short.id) is False
        deleted = await sweep(database, store.blobs, at=clock.at, blob_grace_s=-1)
        assert deleted["files"] == 1 and deleted["blobs"] == 1
        assert await store.get(ALICE, kept.id) == kept

    _run(database_url, body, state_retention_s=100.0)


def test_with_retention_off_files_stay_until_deleted(database_url, clock):
    async def body(store, database):
        stored = await store.create_from_stream(ALICE, "batch", "f", _pieces(b"z"))
        assert stored.expires_at is None and stored.to_openai()["expires_at"] is None
        clock.at += 10 * 365 * 24 * 3600
        assert await store.get(ALICE, stored.id) == stored

    _run(database_url, body, state_retention_s=0.0)


def test_an_upload_over_the_limit_leaves_no_file_and_no_blob(database_url, clock):
    async def body(store, database):
        with pytest.raises(BlobTooLarge):
            await store.create_from_stream(
                ALICE, "batch", "big", _pieces(b"w" * 5000), max_bytes=4999
            )
        assert (await store.list(ALICE)).data == [] and await _count(database, BLOBS) == 0

    _run(database_url, body)
