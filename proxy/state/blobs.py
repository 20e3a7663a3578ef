"""Content-addressed blobs in the database, written and read in chunks.

Uploaded files and the images of stored conversations are blobs: their digest
("sha256:<hex>") names them, so an image sent in ten turns is stored once, and a later turn
refers to it by digest without the client sending it again. They live in the database, not
on a local disk, so every replica on one PostgreSQL sees them and a backup of the database is
a backup of everything.

No blob is ever held whole in memory by this module: an upload is written chunk by chunk, each
chunk its own short transaction, under a temporary name that becomes the digest when the last
chunk is in (so a half-written upload is never visible under a digest, and a crash leaves only
an incomplete row that `sweep` removes); a download reads one chunk per query.

Tables that refer to blobs declare the column with `references_blobs`, and `sweep` keeps
every blob some declared column names.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import sqlalchemy as sa

from .db import METADATA, Database, import_table_modules, now

BLOBS = sa.Table(
    "blobs",
    METADATA,
    sa.Column("digest", sa.String(80), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    # False while an upload is under way (its digest is then a temporary name).
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

BLOB_CHUNKS = sa.Table(
    "blob_chunks",
    METADATA,
    sa.Column("digest", sa.String(80), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# 256 KiB: few enough rows for a 100 MB file (400), small enough that a chunk in flight is
# nothing next to a request's memory.
CHUNK_BYTES = 256 * 1024
# An incomplete upload older than this is a crashed one.
STALE_UPLOAD_S = 3600.0

_REFERENCES: list[sa.Column] = []


def references_blobs(column: sa.Column) -> sa.Column:
    """Declares a column holding blob digests; sweep keeps the blobs it names."""
    _REFERENCES.append(column)
    return column


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int


class BlobTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, db: Database, chunk_bytes: int = CHUNK_BYTES):
        self.db = db
        self.chunk_bytes = chunk_bytes

    async def put_bytes(self, data: bytes) -> BlobRef:
        async def one():
            yield data

        return await self.put_stream(one(), max_bytes=len(data))

    async def put_stream(self, chunks: AsyncIterable[bytes], max_bytes: int) -> BlobRef:
        """Stores what `chunks` yields; BlobTooLarge beyond `max_bytes` (nothing is kept)."""
        temporary = f"partial:{uuid.uuid4().hex}"
        async with self.db.begin() as connection:
            await connection.execute(
                BLOBS.insert().values(digest=temporary, size=0, complete=False, created_at=now())
            )
        hasher, size, seq = hashlib.sha256(), 0, 0
        pending = bytearray()
        try:
            async for piece in chunks:
                size += len(piece)
                if size > max_bytes:
                    raise BlobTooLarge(max_bytes)
                hasher.update(piece)
                pending += piece
                while len(pending) >= self.chunk_bytes:
                    await self._write_chunk(temporary, seq, bytes(pending[: self.chunk_bytes]))
                    del pending[: self.chunk_bytes]
                    seq += 1
            if pending or seq == 0:
                await self._write_chunk(temporary, seq, bytes(pending))
            return await self._seal(temporary, "sha256:" + hasher.hexdigest(), size)
        except BaseException:
            await self._discard(temporary)
            raise

    async def _write_chunk(self, digest: str, seq: int, data: bytes) -> None:
        async with self.db.begin() as connection:
            await connection.execute(BLOB_CHUNKS.insert().values(digest=digest, seq=seq, data=data))
            # An upload still arriving is not a crashed one, however long it has taken.
            await connection.execute(
                BLOBS.update().where(BLOBS.c.digest == digest).values(created_at=now())
            )

    async def _seal(self, temporary: str, digest: str, size: int) -> BlobRef:
        try:
            async with self.db.begin() as connection:
                exists = await connection.scalar(
                    sa.select(BLOBS.c.complete).where(BLOBS.c.digest == digest)
                )
                if exists:
                    await _delete(connection, temporary)
                    # Its owner is about to refer to it: the sweep's grace must cover it now,
                    # however old the first copy is.
                    await connection.execute(
                        BLOBS.update().where(BLOBS.c.digest == digest).values(created_at=now())
                    )
                else:
                    await connection.execute(
                        BLOB_CHUNKS.update()
                        .where(BLOB_CHUNKS.c.digest == temporary)
                        .values(digest=digest)
                    )
                    await connection.execute(
                        BLOBS.update()
                        .where(BLOBS.c.digest == temporary)
                        .values(digest=digest, size=size, complete=True)
                    )
        except sa.exc.IntegrityError:
            # The same content sealed by another writer between our check and our update.
            await self._discard(temporary)
        return BlobRef(digest, size)

    async def _discard(self, temporary: str) -> None:
        async with self.db.begin() as connection:
            await _delete(connection, temporary)

    async def size(self, digest: str) -> int | None:
        async with self.db.begin() as connection:
            return await connection.scalar(
                sa.select(BLOBS.c.size).where(BLOBS.c.digest == digest, BLOBS.c.complete)
            )

    async def iter_chunks(self, digest: str) -> AsyncIterator[bytes]:
        """The blob's bytes, one chunk per query (no transaction is held between chunks)."""
        seq = 0
        while True:
            async with self.db.begin() as connection:
                data = await connection.scalar(
                    sa.select(BLOB_CHUNKS.c.data).where(
                        BLOB_CHUNKS.c.digest == digest, BLOB_CHUNKS.c.seq == seq
                    )
                )
            if data is None:
                return
            yield bytes(data)
            seq += 1

    async def read_bytes(self, digest: str, max_bytes: int) -> bytes | None:
        """The whole blob when it is at most `max_bytes` (images to send to the model); None
        when there is no such blob; BlobTooLarge when it is larger."""
        size = await self.size(digest)
        if size is None:
            return None
        if size > max_bytes:
            raise BlobTooLarge(max_bytes)
        return b"".join([chunk async for chunk in self.iter_chunks(digest)])

    async def sweep(self, grace_s: float = STALE_UPLOAD_S) -> int:
        """Deletes crashed uploads and blobs no declared column refers to, older than
        `grace_s` (an upload that is being attached to its owner is younger); how many."""
        import_table_modules()
        cutoff = now() - grace_s
        unreferenced = sa.and_(
            sa.true(),
            *(
                BLOBS.c.digest.not_in(sa.select(column).where(column.is_not(None)))
                for column in _REFERENCES
            ),
        )
        async with self.db.begin() as connection:
            doomed = list(
                (
                    await connection.execute(
                        sa.select(BLOBS.c.digest).where(
                            BLOBS.c.created_at < cutoff,
                            sa.or_(sa.not_(BLOBS.c.complete), unreferenced),
                        )
                    )
                ).scalars()
            )
            for digest in doomed:
                await _delete(connection, digest)
        return len(doomed)


async def _delete(connection, digest: str) -> None:
    await connection.execute(BLOB_CHUNKS.delete().where(BLOB_CHUNKS.c.digest == digest))
    await connection.execute(BLOBS.delete().where(BLOBS.c.digest == digest))
