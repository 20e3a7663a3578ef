"""Stored files: what clients upload to /v1/files and what batches write (their output and
error files). A file is a row naming its tenant, purpose, name and size, and the digest of the
blob holding its bytes (blobs.py): the bytes stream in and out in chunks, never whole.

Every query is scoped to a tenant and skips expired rows, so another tenant's file and an
expired one are the same as an unknown id. Deleting a file deletes its row; the blob goes at
the next sweep once nothing refers to it (the same bytes may be another file's too).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from .blobs import BlobRef, BlobStore, references_blobs
from .db import METADATA, Database, beyond, now
from .retention import expiring, live
from .settings import StateSettings

# What a client may upload (POST /v1/files `purpose`): batch input, and files for requests
# to refer to. The batches' own files are BATCH_OUTPUT.
UPLOAD_PURPOSES = ("batch", "user_data", "vision")
BATCH_INPUT = "batch"
BATCH_OUTPUT = "batch_output"
ID_PREFIX = "file-"
# OpenAI's bounds on a list page (GET /v1/files `limit`), and its default.
LIST_LIMIT_MAX = 10_000

FILES = sa.Table(
    "files",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("digest", sa.String(80), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Index("ix_files_tenant_created", "tenant", "created_at", "id"),
    sa.Index("ix_files_expires_at", "expires_at"),
    sa.Index("ix_files_digest", "digest"),
)
# The blob sweep keeps what files name; the sweeper deletes files past their expiry.
references_blobs(FILES.c.digest)
expiring(FILES.c.expires_at)


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    digest: str
    created_at: float
    expires_at: float | None

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None if self.expires_at is None else int(self.expires_at),
        }


@dataclass(frozen=True)
class FilePage:
    data: list[StoredFile]
    has_more: bool

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's list object."""
        return {
            "object": "list",
            "data": [stored.to_openai() for stored in self.data],
            "first_id": self.data[0].id if self.data else None,
            "last_id": self.data[-1].id if self.data else None,
            "has_more": self.has_more,
        }


class UnknownCursor(LookupError):
    """`after` names no file of the tenant (unknown, deleted, expired or another's)."""


def new_file_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex


def _stored(row: sa.Row) -> StoredFile:
    return StoredFile(**row._asdict())


class FileStore:
    """The files of every tenant; `settings` gives the retention of new files."""

    def __init__(self, db: Database, blobs: BlobStore, settings: StateSettings):
        self.db = db
        self.blobs = blobs
        self.settings = settings

    async def create_from_stream(
        self,
        tenant: str,
        purpose: str,
        filename: str,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
        ttl_s: float | None = None,
    ) -> StoredFile:
        """A new file holding what `chunks` yields, streamed to a blob chunk by chunk.
        BlobTooLarge beyond `max_bytes` (default --file-max-bytes; nothing is kept);
        `ttl_s`: a shorter life than the retention. Batches write their output and error
        files through this (purpose BATCH_OUTPUT)."""
        limit = self.settings.file_max_bytes if max_bytes is None else max_bytes
        ref = await self.blobs.put_stream(chunks, max_bytes=limit)
        return await self.add(tenant, purpose, filename, ref, ttl_s=ttl_s)

    async def add(
        self, tenant: str, purpose: str, filename: str, ref: BlobRef, *, ttl_s: float | None = None
    ) -> StoredFile:
        """A new file of a blob already stored (the upload route streams the blob first: the
        multipart fields may name the purpose after the file)."""
        created_at = now()
        stored = StoredFile(
            id=new_file_id(),
            tenant=tenant,
            purpose=purpose,
            filename=filename,
            bytes=ref.size,
            digest=ref.digest,
            created_at=created_at,
            expires_at=self.settings.expires_at(created_at, ttl_s),
        )
        async with self.db.begin() as connection:
            await connection.execute(FILES.insert().values(**stored.__dict__))
        return stored

    async def get(self, tenant: str, file_id: str) -> StoredFile | None:
        """The tenant's live file `file_id`; None for an unknown, expired or another
        tenant's id."""
        async with self.db.begin() as connection:
            row = (
                await connection.execute(
                    sa.select(FILES).where(
                        FILES.c.id == file_id,
                        FILES.c.tenant == tenant,
                        live(FILES.c.expires_at, now()),
                    )
                )
            ).first()
        return None if row is None else _stored(row)

    async def list(
        self,
        tenant: str,
        *,
        purpose: str | None = None,
        limit: int = LIST_LIMIT_MAX,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> FilePage:
        """A page of the tenant's live files by creation time (`order`), after the file
        `after` (UnknownCursor if it is not one of theirs)."""
        at = now()
        query = sa.select(FILES).where(FILES.c.tenant == tenant, live(FILES.c.expires_at, at))
        if purpose is not None:
            query = query.where(FILES.c.purpose == purpose)
        key = (FILES.c.created_at, FILES.c.id)
        async with self.db.begin() as connection:
            if after is not None:
                cursor = (
                    await connection.execute(
                        sa.select(FILES.c.created_at, FILES.c.id).where(
                            FILES.c.id == after,
                            FILES.c.tenant == tenant,
                            live(FILES.c.expires_at, at),
                        )
                    )
                ).first()
                if cursor is None:
                    raise UnknownCursor(after)
                query = query.where(beyond(key, tuple(cursor), descending=order == "desc"))
            ordering = [column.desc() if order == "desc" else column.asc() for column in key]
            rows = (await connection.execute(query.order_by(*ordering).limit(limit + 1))).all()
        return FilePage([_stored(row) for row in rows[:limit]], has_more=len(rows) > limit)

    async def delete(self, tenant: str, file_id: str) -> bool:
        """Deletes the tenant's live file; False when there is none such. Its blob is swept
        once nothing else refers to it."""
        async with self.db.begin() as connection:
            result = await connection.execute(
                FILES.delete().where(
                    FILES.c.id == file_id,
                    FILES.c.tenant == tenant,
                    live(FILES.c.expires_at, now()),
                )
            )
        return result.rowcount > 0

    def content(self, stored: StoredFile) -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk."""
        return self.blobs.iter_chunks(stored.digest)
