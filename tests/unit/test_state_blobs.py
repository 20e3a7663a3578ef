"""Content-addressed blobs written and read in chunks (proxy/state/blobs.py), on SQLite and
PostgreSQL (`database_url`, tests/state_fixtures.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.state.blobs import BLOB_CHUNKS, BLOBS, BlobStore, BlobTooLarge, digest_of
from proxy.state.db import Database


def _run(database_url, body):
    async def main():
        database = await Database.open(database_url)
        try:
            return await body(BlobStore(database, chunk_bytes=1000), database)
        finally:
            await database.close()

    return asyncio.run(main())


async def _pieces(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _count(database, table) -> int:
    async with database.begin() as connection:
        return len((await connection.execute(table.select())).all())


def test_streamed_upload_is_chunked_and_named_by_its_digest(database_url):
    data = random.Random(7).randbytes(5500)

    async def body(store, database):
        ref = await store.put_stream(_pieces(data, 700), max_bytes=10_000)
        assert ref.digest == digest_of(data) and ref.size == len(data)
        assert await _count(database, BLOB_CHUNKS) == 6  # 5 full chunks of 1000 and the rest
        chunks = [chunk async for chunk in store.iter_chunks(ref.digest)]
        assert b"".join(chunks) == data and max(map(len, chunks)) == 1000
        assert await store.read_bytes(ref.digest, max_bytes=len(data)) == data

    _run(database_url, body)


def test_the_same_content_is_stored_once(database_url):
    async def body(store, database):
        first = await store.put_bytes(b"x" * 2500)
        second = await store.put_stream(_pieces(b"x" * 2500, 300), max_bytes=2500)
        assert first == second
        assert await _count(database, BLOBS) == 1 and await _count(database, BLOB_CHUNKS) == 3

    _run(database_url, body)


def test_an_oversized_upload_leaves_nothing(database_url):
    async def body(store, database):
        with pytest.raises(BlobTooLarge):
            await store.put_stream(_pieces(b"y" * 5000, 1000), max_bytes=4999)
        assert await _count(database, BLOBS) == 0 and await _count(database, BLOB_CHUNKS) == 0

    _run(database_url, body)


def test_reading_whole_refuses_beyond_the_limit_and_unknown_is_none(database_url):
    async def body(store, database):
        ref = await store.put_bytes(b"z" * 3000)
        with pytest.raises(BlobTooLarge):
            await store.read_bytes(ref.digest, max_bytes=2999)
        assert await store.read_bytes("sha256:" + "0" * 64, max_bytes=10) is None

    _run(database_url, body)


def test_an_empty_blob_round_trips(database_url):
    async def body(store, database):
        ref = await store.put_bytes(b"")
        assert ref.size == 0 and await store.read_bytes(ref.digest, max_bytes=0) == b""

    _run(database_url, body)


def test_sweep_removes_crashed_uploads_and_unreferenced_blobs(database_url):
    async def body(store, database):
        await store.put_bytes(b"kept for now")
        failing = _pieces(b"a" * 3000, 1000)

        async def crash():
            async for piece in failing:
                yield piece
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            await store.put_stream(crash(), max_bytes=10_000)
        assert await _count(database, BLOBS) == 1  # the failed upload cleaned up after itself
        assert await store.sweep(grace_s=3600) == 0  # young blobs are kept
        assert await store.sweep(grace_s=-1) == 1  # nothing refers to it
        assert await _count(database, BLOB_CHUNKS) == 0

    _run(database_url, body)
