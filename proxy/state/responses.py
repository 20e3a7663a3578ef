"""Stored responses (`POST /v1/responses` with `store`, OpenAI's default): the response object,
the request's input items, and the images those items hold, kept as blobs by digest.

- `responses`: one row per stored response: its tenant, status, the response object as
  OpenAI renders it (`body`, JSON: output, usage, error, ...), the response it continues
  (`previous_response_id`), when it expires, and for a background response the process that
  runs it (`owner`) and when that process last said it still does (`heartbeat_at`).
- `response_input_items`: the request's `input`, one row per item in order, each with an id
  (the `after` cursor of `GET /v1/responses/{id}/input_items`). An image part holds the digest
  of its bytes (`image_digest`), never the image itself: the bytes are a blob (blobs.py),
  stored once however many turns send them, and `response_images` names every digest a
  response refers to so the blob sweeper keeps them while the response exists.

A conversation is the chain of `previous_response_id` links; `history` walks it in one
recursive query, bounded in turns and bytes before any item or image is read.

Background responses are leased: the owning process refreshes `heartbeat_at` while it runs
them (proxy/api/responses/background.py); a running response whose lease ran out belongs to a
process that is gone, and `fail_orphans` marks it failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .blobs import BlobStore, references_blobs
from .db import METADATA, Database
from .retention import expiring, live

QUEUED = "queued"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
INCOMPLETE = "incomplete"
FAILED = "failed"
CANCELLED = "cancelled"
RUNNING = (QUEUED, IN_PROGRESS)
MIB = 1024 * 1024


@dataclass(frozen=True)
class ResponsesSettings:
    """Bounds of a stored conversation (`previous_response_id`): each field is the flag
    `--responses-<field>` (proxy/config.py)."""

    # A turn adds at least two messages (its input and its output) and a request holds at most
    # --max-messages (512), so a longer chain could never be sent; the walk stops here first.
    max_history_turns: int = 256
    # What the earlier turns add to a request, images included: as much as a client could
    # send in one body (--max-request-bytes' default), read before any check runs on it.
    max_history_bytes: int = 64 * MIB


RESPONSES = sa.Table(
    "responses",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("background", sa.Boolean, nullable=False),
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("body", sa.Text, nullable=False),
    # What continuing from this response adds to a request: its input items, their images and
    # its output, in bytes as stored (the chain's bound is checked on these alone).
    sa.Column("stored_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),  # None: kept until deleted
    sa.Column("owner", sa.String(64), nullable=True),
    sa.Column("heartbeat_at", sa.Float, nullable=True),
    sa.Index("ix_responses_expires_at", "expires_at"),
    sa.Index("ix_responses_status_heartbeat", "status", "heartbeat_at"),
)

# Items and image references go with their response (ON DELETE CASCADE): a delete, and the
# expiry sweep (retention.py), remove the response row alone.
_RESPONSE_FK = "responses.id"

RESPONSE_INPUT_ITEMS = sa.Table(
    "response_input_items",
    METADATA,
    sa.Column(
        "response_id",
        sa.String(64),
        sa.ForeignKey(_RESPONSE_FK, ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.String(64), nullable=False),
    sa.Column("item", sa.Text, nullable=False),
)

RESPONSE_IMAGES = sa.Table(
    "response_images",
    METADATA,
    sa.Column(
        "response_id",
        sa.String(64),
        sa.ForeignKey(_RESPONSE_FK, ondelete="CASCADE"),
        primary_key=True,
    ),
    references_blobs(sa.Column("digest", sa.String(80), primary_key=True)),
    sa.Index("ix_response_images_digest", "digest"),
)
# Past it (--state-retention-s after creation) a response is unknown, and the sweeper deletes
# it; a running background response too (its end then changes nothing).
expiring(RESPONSES.c.expires_at)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def image_digests(item: dict[str, Any]) -> list[str]:
    """The blob digests an input item refers to (its image parts)."""
    content = item.get("content")
    if not isinstance(content, list):
        return []
    return [part["image_digest"] for part in content if part.get("image_digest")]


@dataclass(frozen=True)
class NewResponse:
    """A response to store, with the request's input items (image parts by digest) and the
    bytes of every image they refer to."""

    id: str
    tenant: str
    body: dict[str, Any]  # the response object; its `status` is the row's
    input_items: Sequence[dict[str, Any]]  # each with its "id"
    images: dict[str, bytes]  # digest -> encoded image
    created_at: float
    expires_at: float | None
    background: bool = False
    previous_response_id: str | None = None
    owner: str | None = None  # the process running it (background responses)


@dataclass(frozen=True)
class StoredResponse:
    id: str
    status: str
    background: bool
    body: dict[str, Any]
    owner: str | None


@dataclass(frozen=True)
class Turn:
    """One stored response of a conversation: the input items it was sent and its output."""

    response_id: str
    input_items: list[dict[str, Any]]
    output: list[dict[str, Any]]


class ConversationTooLong(ValueError):
    def __init__(self, turns: int, stored_bytes: int) -> None:
        super().__init__(f"{turns} turns, {stored_bytes} bytes")
        self.turns = turns
        self.stored_bytes = stored_bytes


class PreviousNotFinished(ValueError):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _live(now: float) -> sa.ColumnElement[bool]:
    return live(RESPONSES.c.expires_at, now)


def _stored_bytes(
    input_items: Iterable[dict[str, Any]], images: dict[str, bytes], body: dict
) -> int:
    items = sum(len(_dumps(item).encode("utf-8")) for item in input_items)
    output = len(_dumps(body.get("output") or []).encode("utf-8"))
    return items + output + sum(len(data) for data in images.values())


class ResponseStore:
    """The stored responses of every tenant; each call is one short transaction."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    # ---- writing ----------------------------------------------------------------------

    async def create(self, new: NewResponse) -> None:
        # The images first, each in its own short transactions (blobs.py); a digest already
        # stored (an earlier turn's image) is not written again.
        for digest, data in new.images.items():
            if await self.blobs.size(digest) is None:
                await self.blobs.put_bytes(data)
        referenced = sorted({d for item in new.input_items for d in image_digests(item)})
        async with self.db.begin() as connection:
            await connection.execute(
                RESPONSES.insert().values(
                    id=new.id,
                    tenant=new.tenant,
                    status=new.body["status"],
                    background=new.background,
                    previous_response_id=new.previous_response_id,
                    body=_dumps(new.body),
                    stored_bytes=_stored_bytes(new.input_items, new.images, new.body),
                    created_at=new.created_at,
                    expires_at=new.expires_at,
                    owner=new.owner,
                    heartbeat_at=new.created_at if new.owner is not None else None,
                )
            )
            if new.input_items:
                await connection.execute(
                    RESPONSE_INPUT_ITEMS.insert(),
                    [
                        {
                            "response_id": new.id,
                            "seq": seq,
                            "item_id": item["id"],
                            "item": _dumps(item),
                        }
                        for seq, item in enumerate(new.input_items)
                    ],
                )
            if referenced:
                await connection.execute(
                    RESPONSE_IMAGES.insert(),
                    [{"response_id": new.id, "digest": digest} for digest in referenced],
                )

    async def update(
        self, response_id: str, body: dict[str, Any], *, only_from: Sequence[str] = RUNNING
    ) -> bool:
        """Replaces the response object (and the row's status with its `status`) if the row's
        status is still one of `only_from`; whether it was. A finished response leaves its
        owner's lease."""
        status = body["status"]
        values: dict[str, Any] = {"status": status, "body": _dumps(body)}
        if status not in RUNNING:
            values["owner"] = None
            values["heartbeat_at"] = None
        async with self.db.begin() as connection:
            if status not in RUNNING:
                # Its output is now part of what continuing from it costs.
                old = await connection.scalar(
                    sa.select(RESPONSES.c.stored_bytes).where(RESPONSES.c.id == response_id)
                )
                if old is not None:
                    output = len(_dumps(body.get("output") or []).encode("utf-8"))
                    values["stored_bytes"] = old + output
            result = await connection.execute(
                RESPONSES.update()
                .where(RESPONSES.c.id == response_id, RESPONSES.c.status.in_(only_from))
                .values(**values)
            )
        return result.rowcount == 1

    async def delete(self, tenant: str, response_id: str, now: float) -> bool:
        async with self.db.begin() as connection:
            found = await connection.scalar(
                sa.select(RESPONSES.c.id).where(
                    RESPONSES.c.id == response_id, RESPONSES.c.tenant == tenant, _live(now)
                )
            )
            if found is None:
                return False
            await connection.execute(RESPONSES.delete().where(RESPONSES.c.id == response_id))
        return True

    # ---- reading ----------------------------------------------------------------------

    async def get(self, tenant: str, response_id: str, now: float) -> StoredResponse | None:
        """The tenant's response; None for an unknown, expired or another tenant's id."""
        async with self.db.begin() as connection:
            row = (
                await connection.execute(
                    sa.select(
                        RESPONSES.c.id,
                        RESPONSES.c.status,
                        RESPONSES.c.background,
                        RESPONSES.c.body,
                        RESPONSES.c.owner,
                    ).where(RESPONSES.c.id == response_id, RESPONSES.c.tenant == tenant, _live(now))
                )
            ).first()
        if row is None:
            return None
        return StoredResponse(row.id, row.status, row.background, json.loads(row.body), row.owner)

    async def input_items(
        self,
        tenant: str,
        response_id: str,
        now: float,
        *,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """A page of the response's input items in `order` of the request's `input`, starting
        after the item `after`, and whether more follow; None for an unknown response."""
        items = RESPONSE_INPUT_ITEMS
        descending = order == "desc"
        async with self.db.begin() as connection:
            if await self._id_of(connection, tenant, response_id, now) is None:
                return None
            query = sa.select(items.c.item).where(items.c.response_id == response_id)
            if after is not None:
                cursor = await connection.scalar(
                    sa.select(sa.func.min(items.c.seq)).where(
                        items.c.response_id == response_id, items.c.item_id == after
                    )
                )
                if cursor is None:
                    return [], False
                query = query.where(items.c.seq < cursor if descending else items.c.seq > cursor)
            query = query.order_by(items.c.seq.desc() if descending else items.c.seq.asc())
            rows = (await connection.execute(query.limit(limit + 1))).scalars().all()
        return [json.loads(row) for row in rows[:limit]], len(rows) > limit

    async def history(
        self, tenant: str, response_id: str, now: float, *, max_turns: int, max_bytes: int
    ) -> list[Turn] | None:
        """The conversation `response_id` ends, oldest turn first: each stored response of
        the chain of `previous_response_id` links, as far as they lead to live responses of
        the tenant (a deleted or expired earlier turn ends the history there). None when
        `response_id` is not the tenant's live response; ConversationTooLong beyond
        `max_turns` or `max_bytes` (checked before any item is read); PreviousNotFinished when
        it is still running."""
        r = RESPONSES
        seed = sa.select(r.c.id, r.c.previous_response_id, sa.literal(1).label("depth")).where(
            r.c.id == response_id, r.c.tenant == tenant, _live(now)
        )
        chain = seed.cte("chain", recursive=True)
        step = (
            sa.select(r.c.id, r.c.previous_response_id, (chain.c.depth + 1).label("depth"))
            .join(chain, r.c.id == chain.c.previous_response_id)
            # One turn past the limit: enough to know it is exceeded, and the walk ends.
            .where(chain.c.depth <= max_turns, r.c.tenant == tenant, _live(now))
        )
        chain = chain.union_all(step)
        async with self.db.begin() as connection:
            rows = (
                await connection.execute(
                    sa.select(chain.c.id, chain.c.depth, r.c.status, r.c.stored_bytes)
                    .join(r, r.c.id == chain.c.id)
                    .order_by(chain.c.depth.desc())
                )
            ).all()
            if not rows:
                return None
            total = sum(row.stored_bytes for row in rows)
            if len(rows) > max_turns or total > max_bytes:
                raise ConversationTooLong(len(rows), total)
            newest = rows[-1]
            if newest.status in RUNNING:
                raise PreviousNotFinished(newest.status)
            ids = [row.id for row in rows]
            bodies = dict(
                (await connection.execute(sa.select(r.c.id, r.c.body).where(r.c.id.in_(ids)))).all()
            )
            items = RESPONSE_INPUT_ITEMS
            item_rows = (
                await connection.execute(
                    sa.select(items.c.response_id, items.c.item)
                    .where(items.c.response_id.in_(ids))
                    .order_by(items.c.response_id, items.c.seq)
                )
            ).all()
        inputs: dict[str, list[dict[str, Any]]] = {turn_id: [] for turn_id in ids}
        for row in item_rows:
            inputs[row.response_id].append(json.loads(row.item))
        return [
            Turn(turn_id, inputs[turn_id], json.loads(bodies[turn_id]).get("output") or [])
            for turn_id in ids
        ]

    async def _id_of(self, connection, tenant: str, response_id: str, now: float) -> str | None:
        return await connection.scalar(
            sa.select(RESPONSES.c.id).where(
                RESPONSES.c.id == response_id, RESPONSES.c.tenant == tenant, _live(now)
            )
        )

    # ---- background leases ------------------------------------------------------------

    async def heartbeat(self, owner: str, running: Iterable[str], now: float) -> set[str]:
        """Renews `owner`'s lease on the responses it runs (`running`: only those, so a
        response whose task ended without writing its end loses its lease and is failed by
        `fail_orphans`); those of them no longer running in the database (cancelled through
        another replica, deleted): the owner stops them."""
        running = list(running)
        if not running:
            return set()
        async with self.db.begin() as connection:
            await connection.execute(
                RESPONSES.update()
                .where(
                    RESPONSES.c.id.in_(running),
                    RESPONSES.c.owner == owner,
                    RESPONSES.c.status.in_(RUNNING),
                )
                .values(heartbeat_at=now)
            )
            still = set(
                (
                    await connection.execute(
                        sa.select(RESPONSES.c.id).where(
                            RESPONSES.c.id.in_(running), RESPONSES.c.status.in_(RUNNING)
                        )
                    )
                ).scalars()
            )
        return set(running) - still

    async def fail_orphans(
        self, now: float, lease_s: float, failed_body: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> list[str]:
        """Marks failed every running background response whose owner has not renewed its
        lease for `lease_s` (the process is gone); `failed_body(body)` is its new object. The
        ids marked."""
        stale = sa.and_(
            RESPONSES.c.status.in_(RUNNING),
            RESPONSES.c.background,
            sa.or_(RESPONSES.c.heartbeat_at.is_(None), RESPONSES.c.heartbeat_at < now - lease_s),
        )
        async with self.db.begin() as connection:
            rows = (
                await connection.execute(sa.select(RESPONSES.c.id, RESPONSES.c.body).where(stale))
            ).all()
        marked = []
        for row in rows:
            # Conditional on the row still being stale: its owner may have renewed meanwhile.
            async with self.db.begin() as connection:
                result = await connection.execute(
                    RESPONSES.update()
                    .where(RESPONSES.c.id == row.id, stale)
                    .values(
                        status=FAILED,
                        body=_dumps(failed_body(json.loads(row.body))),
                        owner=None,
                        heartbeat_at=None,
                    )
                )
            if result.rowcount == 1:
                marked.append(row.id)
        return marked
