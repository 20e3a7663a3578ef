"""Stored responses (proxy/state/responses.py) on both engines (`database_url`): create, read,
delete, input items by page, the conversation chain and its bounds, tenancy, expiry, the
background lease."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.state.blobs import BLOBS, BlobStore, digest_of
from proxy.state.db import Database
from proxy.state.responses import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    RESPONSE_IMAGES,
    RESPONSE_INPUT_ITEMS,
    ConversationTooLong,
    NewResponse,
    PreviousNotFinished,
    ResponseStore,
)
from proxy.state.retention import delete_expired

T0 = 1_000_000.0
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
DIGEST = digest_of(IMAGE)


def run(database_url: str, body) -> Any:
    async def main():
        database = await Database.open(database_url)
        try:
            return await body(ResponseStore(database, BlobStore(database)), database)
        finally:
            await database.close()

    return asyncio.run(main())


def text_item(item_id: str, text: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }


def image_item(item_id: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "detail": "auto", "image_url": None, "image_digest": DIGEST},
        ],
    }


def body(response_id: str, status: str = COMPLETED, text: str = "ok") -> dict:
    output = [{"id": f"msg_{response_id}", "type": "message", "role": "assistant",
               "content": [{"type": "output_text", "text": text}]}]  # fmt: skip
    return {"id": response_id, "object": "response", "status": status, "output": output}


def new(
    response_id: str,
    *,
    tenant: str = "t1",
    items: list[dict] | None = None,
    previous: str | None = None,
    expires_at: float | None = None,
    status: str = COMPLETED,
    owner: str | None = None,
    created_at: float = T0,
) -> NewResponse:
    items = items if items is not None else [text_item(f"in_{response_id}", response_id)]
    has_image = any(part.get("image_digest") for item in items for part in item["content"])
    return NewResponse(
        id=response_id,
        tenant=tenant,
        body=body(response_id, status),
        input_items=items,
        images={DIGEST: IMAGE} if has_image else {},
        created_at=created_at,
        expires_at=expires_at,
        background=owner is not None,
        previous_response_id=previous,
        owner=owner,
    )


async def count(database: Database, table: sa.Table) -> int:
    async with database.begin() as connection:
        return await connection.scalar(sa.select(sa.func.count()).select_from(table))


def test_a_stored_response_is_read_back_by_its_tenant_only(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_a", items=[image_item("msg_1")]))
        found = await store.get("t1", "resp_a", T0)
        assert found is not None and found.body == body("resp_a") and found.status == COMPLETED
        assert await store.get("t2", "resp_a", T0) is None
        assert await store.get("t1", "resp_unknown", T0) is None
        # The image is a blob, stored once, referred to by digest.
        assert await store.blobs.read_bytes(DIGEST, max_bytes=10_000) == IMAGE
        await store.create(new("resp_b", items=[image_item("msg_2")]))
        assert await count(database, BLOBS) == 1
        assert await count(database, RESPONSE_IMAGES) == 2

    run(database_url, check)


def test_delete_is_the_tenants_and_removes_items_and_image_references(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_a", items=[image_item("msg_1")]))
        assert not await store.delete("t2", "resp_a", T0)
        assert await store.delete("t1", "resp_a", T0)
        assert not await store.delete("t1", "resp_a", T0)
        assert await store.get("t1", "resp_a", T0) is None
        assert await count(database, RESPONSE_INPUT_ITEMS) == 0
        assert await count(database, RESPONSE_IMAGES) == 0
        assert await store.blobs.sweep(grace_s=-1) == 1  # nothing refers to the image now

    run(database_url, check)


def test_input_items_pages_in_both_orders(database_url):
    items = [text_item(f"msg_{i}", str(i)) for i in range(5)]

    async def check(store: ResponseStore, database):
        await store.create(new("resp_a", items=items))
        page, more = await store.input_items("t1", "resp_a", T0, limit=2)
        assert [item["id"] for item in page] == ["msg_4", "msg_3"] and more
        page, more = await store.input_items("t1", "resp_a", T0, after="msg_3", limit=2)
        assert [item["id"] for item in page] == ["msg_2", "msg_1"] and more
        page, more = await store.input_items("t1", "resp_a", T0, after="msg_1", limit=2)
        assert [item["id"] for item in page] == ["msg_0"] and not more
        page, more = await store.input_items("t1", "resp_a", T0, order="asc", after="msg_2")
        assert [item["id"] for item in page] == ["msg_3", "msg_4"] and not more
        assert await store.input_items("t1", "resp_a", T0, after="msg_x") == ([], False)
        assert await store.input_items("t2", "resp_a", T0) is None

    run(database_url, check)


def test_history_follows_the_chain_oldest_first(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_1", items=[image_item("msg_1")]))
        await store.create(new("resp_2", previous="resp_1"))
        await store.create(new("resp_3", previous="resp_2"))
        turns = await store.history("t1", "resp_3", T0, max_turns=10, max_bytes=10**6)
        assert [turn.response_id for turn in turns] == ["resp_1", "resp_2", "resp_3"]
        assert turns[0].input_items == [image_item("msg_1")]
        assert turns[1].output == body("resp_2")["output"]
        # Another tenant's chain is unknown, as an unknown id.
        assert await store.history("t2", "resp_3", T0, max_turns=10, max_bytes=10**6) is None
        assert await store.history("t1", "resp_9", T0, max_turns=10, max_bytes=10**6) is None

    run(database_url, check)


def test_history_is_bounded_in_turns_and_bytes_before_reading_items(database_url):
    async def check(store: ResponseStore, database):
        previous = None
        for i in range(5):
            await store.create(new(f"resp_{i}", previous=previous))
            previous = f"resp_{i}"
        assert len(await store.history("t1", "resp_4", T0, max_turns=5, max_bytes=10**6)) == 5
        with pytest.raises(ConversationTooLong) as caught:
            await store.history("t1", "resp_4", T0, max_turns=4, max_bytes=10**6)
        assert caught.value.turns == 5  # one past the limit, and the walk stopped there
        with pytest.raises(ConversationTooLong):
            await store.history("t1", "resp_4", T0, max_turns=5, max_bytes=100)

    run(database_url, check)


def test_a_deleted_or_expired_earlier_turn_ends_the_history_there(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_1", expires_at=T0 + 10))
        await store.create(new("resp_2", previous="resp_1"))
        await store.create(new("resp_3", previous="resp_2"))
        turns = await store.history("t1", "resp_3", T0, max_turns=10, max_bytes=10**6)
        assert len(turns) == 3
        turns = await store.history("t1", "resp_3", T0 + 10, max_turns=10, max_bytes=10**6)
        assert [turn.response_id for turn in turns] == ["resp_2", "resp_3"]
        await store.delete("t1", "resp_2", T0)
        turns = await store.history("t1", "resp_3", T0, max_turns=10, max_bytes=10**6)
        assert [turn.response_id for turn in turns] == ["resp_3"]

    run(database_url, check)


def test_continuing_a_running_response_is_refused(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_1", status=QUEUED, owner="p1"))
        with pytest.raises(PreviousNotFinished):
            await store.history("t1", "resp_1", T0, max_turns=10, max_bytes=10**6)

    run(database_url, check)


def test_expired_responses_are_unknown_and_swept(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_old", expires_at=T0 + 5, items=[image_item("msg_1")]))
        await store.create(new("resp_new", expires_at=T0 + 50))
        await store.create(new("resp_kept"))  # no retention: kept until deleted
        await store.create(new("resp_running", expires_at=T0 + 5, status=IN_PROGRESS, owner="p"))
        assert await store.get("t1", "resp_old", T0 + 4) is not None
        assert await store.get("t1", "resp_old", T0 + 5) is None
        assert await store.input_items("t1", "resp_old", T0 + 5) is None
        deleted = await delete_expired(database, T0 + 5)
        assert deleted["responses"] == 2  # the running one too: its end then changes nothing
        assert await count(database, RESPONSE_IMAGES) == 0
        assert await count(database, RESPONSE_INPUT_ITEMS) == 2  # resp_new's and resp_kept's
        assert not await store.update("resp_running", body("resp_running"))  # gone
        assert await store.get("t1", "resp_new", T0 + 5) is not None
        assert await store.get("t1", "resp_kept", T0 + 10**9) is not None

    run(database_url, check)


def test_update_is_conditional_on_the_status(database_url):
    async def check(store: ResponseStore, database):
        await store.create(new("resp_b", status=QUEUED, owner="p1"))
        assert await store.update("resp_b", body("resp_b", IN_PROGRESS), only_from=(QUEUED,))
        assert await store.update("resp_b", body("resp_b", CANCELLED))
        # The generation's end does not overwrite a cancellation.
        assert not await store.update("resp_b", body("resp_b", COMPLETED))
        found = await store.get("t1", "resp_b", T0)
        assert found.status == CANCELLED and found.owner is None

    run(database_url, check)


def test_the_lease_renewed_keeps_a_response_and_a_lapsed_one_fails(database_url):
    def failed(old: dict) -> dict:
        return {**old, "status": FAILED, "error": {"code": "x", "message": "gone"}}

    async def check(store: ResponseStore, database):
        await store.create(new("resp_live", status=IN_PROGRESS, owner="alive", created_at=T0))
        await store.create(new("resp_dead", status=IN_PROGRESS, owner="dead", created_at=T0))
        await store.create(new("resp_sync", status=COMPLETED, created_at=T0))
        await store.create(new("resp_gone", status=QUEUED, owner="alive", created_at=T0))
        await store.update("resp_gone", body("resp_gone", CANCELLED))
        stop = await store.heartbeat("alive", ["resp_live", "resp_gone"], T0 + 20)
        assert stop == {"resp_gone"}  # cancelled elsewhere: its owner stops it
        assert await store.fail_orphans(T0 + 31, 30.0, failed) == ["resp_dead"]
        dead = await store.get("t1", "resp_dead", T0)
        assert dead.status == FAILED and dead.body["error"]["message"] == "gone"
        assert (await store.get("t1", "resp_live", T0)).status == IN_PROGRESS
        assert await store.fail_orphans(T0 + 31, 30.0, failed) == []

    run(database_url, check)
