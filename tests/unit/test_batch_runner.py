"""The batch runner (proxy/api/batches/runner.py) on SQLite with files in memory and a scripted
endpoint: a runner stopped mid-batch gives its lines back and another finishes them (each
answered once), a line whose claims run out is failed, an expired batch reports its unanswered
lines, a draining proxy claims nothing, and lines hold admission slots."""

from __future__ import annotations

import asyncio
import json

from helpers import wait_until_async

from proxy.api.batches.execute import LineResponse
from proxy.api.batches.runner import BatchRunner, FileMissing
from proxy.serving.admission import Admission, AdmissionSettings
from proxy.state.batches import BATCHES, BatchSettings, BatchStatus, BatchStore
from proxy.state.db import Database, sqlite_url

SETTINGS = BatchSettings(lease_s=30.0, poll_s=0.02, line_attempts=2)


class MemoryFiles:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def content(self, tenant, file_id):
        if file_id not in self.files:
            raise FileMissing(file_id)
        data = self.files[file_id]
        for start in range(0, len(data), 7):  # small chunks: lines cross them
            yield data[start : start + 7]

    async def create(self, tenant, *, filename, purpose, chunks):
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = b"".join([chunk async for chunk in chunks])
        return file_id

    def lines(self, file_id):
        return [json.loads(line) for line in self.files[file_id].splitlines()]


class Endpoint:
    """Answers each line with its custom_id after `delay_s`; counts what it ran."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.ran: list[str] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, line):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
            self.ran.append(line.custom_id)
            return LineResponse(200, {"echo": line.custom_id}, "req", 2, 1)
        finally:
            self.running -= 1


def lines_file(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"c{n}", "method": "POST", "url": "/v1/chat/completions", "body": {}}
        ).encode()
        + b"\n"
        for n in range(count)
    )


def run(tmp_path, body):
    async def main():
        database = await Database.open(sqlite_url(tmp_path))
        try:
            return await body(BatchStore(database))
        finally:
            await database.close()

    return asyncio.run(main())


def make_runner(store, files, endpoint, admission=None, concurrency=3, settings=SETTINGS):
    return BatchRunner(
        store,
        files,
        endpoint,
        settings,
        admission=admission or Admission(AdmissionSettings(max_concurrent_requests=8)),
        concurrency=concurrency,
        max_line_bytes=10_000,
    )


async def create(store, files, count):
    files.files["input"] = lines_file(count)
    return await store.create(
        tenant="t",
        input_file_id="input",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=None,
    )


async def ended(store, batch_id):
    async def done():
        batch = await store.get("t", batch_id)
        return batch if batch.status in (BatchStatus.COMPLETED, BatchStatus.EXPIRED) else None

    return await wait_until_async(done, timeout=20, what="the batch to end")


def test_a_stopped_runner_gives_its_lines_back_and_another_finishes_each_once(tmp_path):
    async def body(store):
        files, slow = MemoryFiles(), Endpoint(delay_s=0.1)
        batch = await create(store, files, 12)
        first = make_runner(store, files, slow)
        first.start()

        async def some_answered():
            return (await store.get("t", batch.id)).completed >= 3

        await wait_until_async(some_answered, what="some answers")
        await first.stop()  # mid-batch: lines under way are given back
        after = await store.get("t", batch.id)
        assert after.status is BatchStatus.IN_PROGRESS and 3 <= after.completed < 12
        second = make_runner(store, files, Endpoint())
        second.start()
        try:
            done = await ended(store, batch.id)
        finally:
            await second.stop()
        assert (done.total, done.completed, done.failed) == (12, 12, 0)
        output = files.lines(done.output_file_id)
        assert [line["custom_id"] for line in output] == [f"c{n}" for n in range(12)]
        assert all(line["response"]["body"] == {"echo": line["custom_id"]} for line in output)
        assert (done.input_tokens, done.output_tokens) == (24, 12)

    run(tmp_path, body)


def test_a_line_whose_claims_run_out_is_failed_not_retried_forever(tmp_path):
    async def body(store):
        files = MemoryFiles()
        batch = await create(store, files, 2)
        validator = make_runner(store, files, Endpoint())
        await validator._validate(await store.claim_batch(validator.owner, 30.0))
        # Two processes died running line 1 (claims whose leases are over at once).
        for owner in ("dead-1", "dead-2"):
            assert [line.line for line in await store.claim_lines(owner, 1, -1.0)] == [1]
        endpoint = Endpoint()
        runner = make_runner(store, files, endpoint)
        runner.start()
        try:
            done = await ended(store, batch.id)
        finally:
            await runner.stop()
        assert (done.completed, done.failed) == (1, 1) and endpoint.ran == ["c1"]
        (error,) = files.lines(done.error_file_id)
        assert error["custom_id"] == "c0" and error["response"] is None
        assert error["error"]["code"] == "line_attempts_exhausted"

    run(tmp_path, body)


def test_an_expired_batch_reports_its_unanswered_lines(tmp_path):
    async def body(store):
        files = MemoryFiles()
        batch = await create(store, files, 3)
        validator = make_runner(store, files, Endpoint())
        await validator._validate(await store.claim_batch(validator.owner, 30.0))
        (line,) = await store.claim_lines("w", 1, 30.0)
        async with store.db.begin() as connection:
            await connection.execute(
                BATCHES.update().where(BATCHES.c.id == batch.id).values(expires_at=0.0)
            )
        runner = make_runner(store, files, Endpoint())
        runner.start()
        try:
            done = await ended(store, batch.id)
        finally:
            await runner.stop()
        assert done.status is BatchStatus.EXPIRED and done.expired_at is not None
        assert (done.completed, done.failed, done.output_file_id) == (0, 3, None)
        errors = files.lines(done.error_file_id)
        assert [e["custom_id"] for e in errors] == ["c0", "c1", "c2"]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}

    run(tmp_path, body)


def test_lines_hold_admission_slots_and_a_draining_proxy_claims_nothing(tmp_path):
    async def body(store):
        files, endpoint = MemoryFiles(), Endpoint(delay_s=0.02)
        admission = Admission(AdmissionSettings(max_concurrent_requests=3))
        admission.in_flight = 2  # interactive requests hold two of the three slots
        batch = await create(store, files, 6)
        runner = make_runner(store, files, endpoint, admission, concurrency=4)
        runner.start()
        try:
            await ended(store, batch.id)
        finally:
            await runner.stop()
        assert endpoint.most_running == 1  # the one slot left
        assert admission.in_flight == 2
        admission.draining = True
        waiting = await create(store, files, 2)
        draining = make_runner(store, files, endpoint, admission)
        draining.start()
        try:
            await asyncio.sleep(10 * SETTINGS.poll_s)  # ten looks for work
        finally:
            await draining.stop()
        assert (await store.get("t", waiting.id)).status is BatchStatus.VALIDATING

    run(tmp_path, body)


def test_a_missing_input_file_fails_validation(tmp_path):
    async def body(store):
        files = MemoryFiles()
        batch = await create(store, files, 1)
        del files.files["input"]
        runner = make_runner(store, files, Endpoint())
        await runner._validate(await store.claim_batch(runner.owner, 30.0))
        failed = await store.get("t", batch.id)
        assert failed.status is BatchStatus.FAILED
        assert failed.errors[0]["code"] == "input_file_not_found"

    run(tmp_path, body)


def test_the_derived_concurrency_is_half_the_cap_at_most_four_shared_by_workers():
    assert BatchSettings().lines_in_flight(64) == 4
    assert BatchSettings().lines_in_flight(6) == 3
    assert BatchSettings().lines_in_flight(1) == 1
    assert BatchSettings().lines_in_flight(64, workers=3) == 1
    assert BatchSettings(concurrency=5).lines_in_flight(64, workers=2) == 2
