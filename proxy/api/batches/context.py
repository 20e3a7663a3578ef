"""The Batch API's part of the app: its store and this process's runner, started once the
database is open (proxy/state/context.py) and stopped before it closes. Without stored state
(--no-state) there is neither, and the batch routes answer 501."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from ...keys import BLOBS_KEY, CONFIG_KEY, DATABASE_KEY
from ...serving.admission import ADMISSION_KEY
from ...state.batches import BatchStore
from ...state.files import FileStore
from ..batches.execute import execute_line
from .runner import BatchRunner, FileMissing

log = logging.getLogger("proxy.batches")

BATCH_STORE_KEY = web.AppKey("batch_store", BatchStore)
BATCH_RUNNER_KEY = web.AppKey("batch_runner", BatchRunner)


class RunnerFiles:
    """The Files API's store as the runner uses it: input read by id, output written."""

    def __init__(self, files: FileStore) -> None:
        self.files = files

    async def content(self, tenant: str, file_id: str) -> AsyncIterator[bytes]:
        stored = await self.files.get(tenant, file_id)
        if stored is None:
            raise FileMissing(file_id)
        async for chunk in self.files.content(stored):
            yield chunk

    async def create(
        self, tenant: str, *, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> str:
        # No size limit of its own: its lines are the answers to at most --batch-max-lines
        # requests, each bounded by the model's max_tokens.
        stored = await self.files.create_from_stream(
            tenant, purpose, filename, chunks, max_bytes=sys.maxsize
        )
        return stored.id


async def batch_context(app: web.Application) -> AsyncIterator[None]:
    if DATABASE_KEY not in app:
        yield
        return
    config = app[CONFIG_KEY]
    database = app[DATABASE_KEY]
    store = app[BATCH_STORE_KEY] = BatchStore(database)
    files = RunnerFiles(FileStore(database, app[BLOBS_KEY], config.state))

    async def execute(line):
        return await execute_line(app, line.endpoint, line.request, line.tenant)

    runner = app[BATCH_RUNNER_KEY] = BatchRunner(
        store,
        files,
        execute,
        config.batch,
        admission=app[ADMISSION_KEY],
        concurrency=config.batch.lines_in_flight(
            config.admission.max_concurrent_requests, config.server.workers
        ),
        max_line_bytes=config.admission.max_request_bytes,
    )
    runner.start()
    log.info("batch runner %s: up to %d lines at once", runner.owner, runner.concurrency)
    try:
        yield
    finally:
        await runner.stop()
