"""The Batch API's store (proxy/state/batches.py) on SQLite and PostgreSQL (`database_url`):
batches per tenant, validated lines, leases with expiry and fences, answers recorded once with
exact counts, sealing, and two stores (two processes) claiming lines at once."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.state.batches import (
    Answer,
    BatchStatus,
    BatchStore,
    NewLine,
    NotCancellable,
    Outcome,
)
from proxy.state.db import Database

LEASE_S = 30.0


def run(database_url, body, stores: int = 1):
    async def main():
        databases = [await Database.open(database_url) for _ in range(stores)]
        try:
            return await body(*(BatchStore(database) for database in databases))
        finally:
            for database in databases:
                await database.close()

    return asyncio.run(main())


async def new_batch(store: BatchStore, tenant: str = "t1", **overrides):
    values = {
        "tenant": tenant,
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"job": "captions"},
        **overrides,
    }
    return await store.create(**values)


def request_line(number: int) -> NewLine:
    return NewLine(number, f"req-{number}", request=json.dumps({"messages": [], "n": number}))


async def validated(store: BatchStore, lines: int, bad: tuple[int, ...] = ()):
    """A batch in progress with `lines` lines, the numbers in `bad` stored as bad lines."""
    batch = await new_batch(store)
    claimed = await store.claim_batch("validator", LEASE_S)
    assert claimed.id == batch.id and claimed.status is BatchStatus.VALIDATING
    rows = [
        NewLine(n, f"req-{n}", outcome=Outcome.FAILED, result=f'{{"bad": {n}}}')
        if n in bad
        else request_line(n)
        for n in range(1, lines + 1)
    ]
    assert await store.add_lines("validator", batch.id, rows, LEASE_S)
    assert await store.finish_validation(
        "validator", batch.id, total=lines, failed=len(bad), lease_s=LEASE_S
    )
    return await store.get("t1", batch.id)


def answer(line: int, outcome: Outcome = Outcome.COMPLETED) -> Answer:
    return Answer(outcome, json.dumps({"line": line}), input_tokens=3, output_tokens=2)


def test_batches_are_the_tenants_own_and_list_newest_first_in_pages(database_url):
    async def body(store):
        made = [await new_batch(store) for _ in range(5)]
        other = await new_batch(store, tenant="t2")
        assert await store.get("t1", other.id) is None
        assert (await store.get("t2", other.id)).id == other.id
        first, more = await store.page("t1", after=None, limit=2)
        assert [b.id for b in first] == [made[4].id, made[3].id] and more
        rest, more = await store.page("t1", after=first[-1].id, limit=10)
        assert [b.id for b in rest] == [made[2].id, made[1].id, made[0].id] and not more
        assert await store.page("t1", after=other.id, limit=10) is None  # not theirs
        openai = made[0].to_openai()
        assert openai["object"] == "batch" and openai["status"] == "validating"
        assert openai["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert openai["expires_at"] - openai["created_at"] == 24 * 3600
        assert openai["metadata"] == {"job": "captions"} and openai["errors"] is None

    run(database_url, body)


def test_lines_are_answered_once_with_exact_counts_then_the_batch_finalizes(database_url):
    async def body(store):
        batch = await validated(store, 4, bad=(2,))
        assert batch.status is BatchStatus.IN_PROGRESS
        assert (batch.total, batch.completed, batch.failed) == (4, 0, 1)
        lines = await store.claim_lines("w1", 10, LEASE_S)
        assert [line.line for line in lines] == [1, 3, 4]  # the bad line is not run
        assert lines[0].custom_id == "req-1" and json.loads(lines[0].request)["n"] == 1
        assert await store.claim_lines("w2", 10, LEASE_S) == []  # all leased
        assert await store.record(batch.id, 1, answer(1))
        assert not await store.record(batch.id, 1, answer(1))  # a second answer is dropped
        assert await store.record(batch.id, 3, answer(3, Outcome.FAILED))
        assert (await store.get("t1", batch.id)).status is BatchStatus.IN_PROGRESS
        assert await store.record(batch.id, 4, answer(4))
        done = await store.get("t1", batch.id)
        assert done.status is BatchStatus.FINALIZING and done.sealed
        assert (done.total, done.completed, done.failed) == (4, 2, 2)
        assert (done.input_tokens, done.output_tokens) == (9, 6)  # bad lines cost nothing
        output = [row async for row in store.iter_results(batch.id, Outcome.COMPLETED)]
        errors = [row async for row in store.iter_results(batch.id, Outcome.FAILED)]
        assert [line for line, _, _ in output] == [1, 4]
        assert [line for line, _, _ in errors] == [2, 3]

    run(database_url, body)


def test_an_expired_line_lease_is_claimed_again_and_the_first_answer_wins(database_url):
    async def body(store):
        batch = await validated(store, 2)
        # A lease that is over at once: the process holding it "died".
        first = await store.claim_lines("dead", 1, lease_s=-1.0)
        again = await store.claim_lines("alive", 5, LEASE_S)
        assert [line.line for line in first] == [1]
        assert [line.line for line in again] == [1, 2] and again[0].attempts == 2
        assert await store.record(batch.id, 1, answer(1))
        assert not await store.record(batch.id, 1, answer(1))  # the slow one, too late
        assert (await store.get("t1", batch.id)).completed == 1

    run(database_url, body)


def test_renewal_keeps_leases_and_names_batches_that_stopped(database_url):
    async def body(store):
        batch = await validated(store, 3)
        await store.claim_lines("w1", 2, lease_s=-1.0)
        assert await store.renew_lines("w1", LEASE_S) == set()
        assert [line.line for line in await store.claim_lines("w2", 5, LEASE_S)] == [3]
        await store.request_cancel("t1", batch.id)
        assert await store.renew_lines("w1", LEASE_S) == {batch.id}

    run(database_url, body)


def test_released_lines_are_claimable_and_a_refund_undoes_the_attempt(database_url):
    async def body(store):
        await validated(store, 1)
        (line,) = await store.claim_lines("w1", 1, LEASE_S)
        await store.release_lines("w1", [line.key], refund_attempt=True)
        (again,) = await store.claim_lines("w2", 1, LEASE_S)
        assert again.attempts == 1

    run(database_url, body)


def test_a_validation_that_lost_its_lease_cannot_write(database_url):
    async def body(store):
        batch = await new_batch(store)
        assert (await store.claim_batch("slow", lease_s=-1.0)).id == batch.id
        assert (await store.claim_batch("next", LEASE_S)).id == batch.id
        assert await store.claim_batch("third", LEASE_S) is None  # leased
        assert not await store.add_lines("slow", batch.id, [request_line(1)], LEASE_S)
        assert not await store.finish_validation("slow", batch.id, total=1, failed=0, lease_s=1)
        assert await store.restart_validation("next", batch.id, LEASE_S)
        assert await store.add_lines("next", batch.id, [request_line(1)], LEASE_S)
        assert await store.line_counts(batch.id) == {None: 1}

    run(database_url, body)


def test_failed_validation_keeps_its_errors_and_no_line(database_url):
    async def body(store):
        batch = await new_batch(store)
        await store.claim_batch("v", LEASE_S)
        await store.add_lines("v", batch.id, [request_line(1), request_line(2)], LEASE_S)
        errors = [{"code": "duplicate_custom_id", "message": "m", "param": "custom_id", "line": 2}]
        assert await store.fail_validation("v", batch.id, errors, LEASE_S)
        failed = await store.get("t1", batch.id)
        assert failed.status is BatchStatus.FAILED and failed.failed_at is not None
        assert failed.to_openai()["errors"] == {"object": "list", "data": errors}
        assert await store.line_counts(batch.id) == {}
        with pytest.raises(NotCancellable):
            await store.request_cancel("t1", batch.id)

    run(database_url, body)


def test_cancel_stops_validation_and_sealing_drops_later_answers(database_url):
    async def body(store):
        running = await validated(store, 3)
        await store.claim_lines("w", 3, LEASE_S)
        assert await store.record(running.id, 1, answer(1))
        batch = await new_batch(store)
        await store.claim_batch("v", LEASE_S)
        cancelling = await store.request_cancel("t1", batch.id)
        assert cancelling.status is BatchStatus.CANCELLING and cancelling.cancelling_at
        assert (await store.request_cancel("t1", batch.id)).status is BatchStatus.CANCELLING
        assert not await store.add_lines("v", batch.id, [request_line(1)], LEASE_S)
        assert await store.request_cancel("t2", batch.id) is None

        await store.request_cancel("t1", running.id)
        claimed = await store.claim_batch("ender", LEASE_S)
        assert claimed.id == running.id  # the oldest first
        await store.release_batch("ender", running.id)
        assert await store.seal("ender", running.id, LEASE_S, expire=False) is None  # released
        assert (await store.claim_batch("ender", LEASE_S)).id == running.id
        assert (await store.seal("ender", running.id, LEASE_S, expire=False)).sealed
        assert not await store.record(running.id, 2, answer(2))  # after the seal: dropped
        assert await store.end("ender", running.id, BatchStatus.CANCELLED, LEASE_S)
        ended = await store.get("t1", running.id)
        assert ended.status is BatchStatus.CANCELLED and ended.cancelled_at
        assert (ended.total, ended.completed, ended.failed) == (3, 1, 0)
        assert await store.line_counts(running.id) == {}
        assert (await store.claim_batch("ender", LEASE_S)).id == batch.id

    run(database_url, body)


def test_an_expired_batch_counts_its_unanswered_lines_as_failed(database_url):
    async def body(store):
        batch = await validated(store, 3)
        await store.claim_lines("w", 1, LEASE_S)
        assert await store.record(batch.id, 1, answer(1))
        assert await store.claim_batch("x", LEASE_S) is None  # not expired yet
        # The window ran out (moved here instead of waiting a day).
        from proxy.state.batches import BATCHES

        async with store.db.begin() as connection:
            await connection.execute(
                BATCHES.update().where(BATCHES.c.id == batch.id).values(expires_at=0.0)
            )
        assert await store.claim_lines("w", 5, LEASE_S) == []  # nothing more runs
        claimed = await store.claim_batch("x", LEASE_S)
        assert claimed.id == batch.id and claimed.status is BatchStatus.IN_PROGRESS
        sealed = await store.seal("x", batch.id, LEASE_S, expire=True)
        assert (sealed.completed, sealed.failed) == (1, 2)
        errors = [row async for row in store.iter_results(batch.id, Outcome.FAILED)]
        assert [(line, result) for line, _, result in errors] == [(2, None), (3, None)]
        assert await store.set_file("x", batch.id, "error_file_id", "file-err", LEASE_S)
        assert await store.end("x", batch.id, BatchStatus.EXPIRED, LEASE_S)
        ended = await store.get("t1", batch.id)
        assert ended.status is BatchStatus.EXPIRED and ended.error_file_id == "file-err"

    run(database_url, body)


def test_two_processes_claiming_at_once_never_take_the_same_line(database_url):
    lines = 120

    async def body(first, second):
        batch = await validated(first, lines)

        async def worker(store, owner):
            taken = []
            while claimed := await store.claim_lines(owner, 7, LEASE_S):
                for line in claimed:
                    assert await store.record(batch.id, line.line, answer(line.line))
                    taken.append(line.line)
            return taken

        a, b = await asyncio.gather(worker(first, "a"), worker(second, "b"))
        assert sorted(a + b) == list(range(1, lines + 1))
        done = await first.get("t1", batch.id)
        assert done.status is BatchStatus.FINALIZING and done.completed == lines

    run(database_url, body, stores=2)


def test_a_batch_is_kept_its_retention_after_its_window_then_swept_with_its_lines(database_url):
    from proxy.state.batches import BATCHES
    from proxy.state.retention import delete_expired

    async def body(store):
        kept = await validated(store, 2)  # no retention: kept until deleted
        batch = await new_batch(store, retention_s=3600.0)
        assert batch.expires_at - batch.created_at == 24 * 3600
        await store.claim_batch("v", LEASE_S)  # the older `kept` was validated already
        await store.add_lines("v", batch.id, [request_line(1)], LEASE_S)
        window_end = batch.expires_at
        assert (await delete_expired(store.db, window_end + 3599))["batches"] == 0
        async with store.db.begin() as connection:  # as if the retention had passed
            await connection.execute(
                BATCHES.update().where(BATCHES.c.id == batch.id).values(retained_until=1.0)
            )
        assert await store.get("t1", batch.id) is None  # expired rows are never served
        assert [b.id for b in (await store.page("t1", after=None, limit=5))[0]] == [kept.id]
        assert (await delete_expired(store.db, window_end))["batches"] == 1
        assert await store.line_counts(batch.id) == {}  # its lines went with it
        assert await store.line_counts(kept.id) == {None: 2}

    run(database_url, body)


def test_a_stopping_runner_gives_back_every_lease_it_holds(database_url):
    async def body(store):
        await validated(store, 3)
        waiting = await new_batch(store)
        await store.claim_lines("stopping", 2, LEASE_S)
        assert (await store.claim_batch("stopping", LEASE_S)).id == waiting.id
        await store.release_all("stopping")
        lines = await store.claim_lines("next", 5, LEASE_S)
        assert [(line.line, line.attempts) for line in lines] == [(1, 1), (2, 1), (3, 1)]
        assert (await store.claim_batch("next", LEASE_S)).id == waiting.id

    run(database_url, body)
