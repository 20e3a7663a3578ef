"""The app's stored state: the database opened once per process at start (migrations applied),
its BlobStore, and the sweeper that deletes what expired, all closed at shutdown.

`state_context` is a cleanup context of the app (proxy/app.py). With --no-state nothing is
opened, and `require_state` answers the stateful routes' requests with 501 in the envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..error_catalogue import STATE_DISABLED
from ..keys import BLOBS_KEY, CONFIG_KEY, DATABASE_KEY
from .blobs import STALE_UPLOAD_S, BlobStore
from .db import Database, now
from .retention import delete_expired
from .settings import StateSettings

log = logging.getLogger("proxy.state")


def require_state(request: web.Request, what: str) -> tuple[Database, BlobStore]:
    """The database and blob store; 501 (`state_disabled`) naming `what` ("files") when the
    proxy runs without state."""
    app = request.app
    if DATABASE_KEY not in app:
        raise STATE_DISABLED(what=what)
    return app[DATABASE_KEY], app[BLOBS_KEY]


async def state_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG_KEY].state
    if not settings.enabled:
        log.info("stored state: off (--no-state): files, stored responses and batches answer 501")
        yield
        return
    try:
        database = await Database.open(settings.url)
    except Exception as exc:
        # Said plainly before aiohttp's traceback: the usual causes are a wrong URL, an
        # unreachable server or an unwritable --state-dir.
        log.error("cannot open the database %s: %s", settings.shown_url, exc)
        raise
    retention = settings.state_retention_s
    log.info(
        "stored state: %s, schema version %d; uploads up to %d bytes; objects kept %s, "
        "swept every %g s",
        settings.shown_url,
        await database.schema_version(),
        settings.file_max_bytes,
        f"{retention:.0f} s" if retention else "until deleted",
        settings.state_sweep_interval_s,
    )
    app[DATABASE_KEY] = database
    app[BLOBS_KEY] = blobs = BlobStore(database)
    sweeper = asyncio.create_task(sweep_periodically(database, blobs, settings))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await database.close()


async def sweep(
    database: Database,
    blobs: BlobStore,
    *,
    at: float | None = None,
    blob_grace_s: float = STALE_UPLOAD_S,
) -> dict[str, int]:
    """One sweep: rows expired at `at` (now), then blobs nothing refers to any more and
    older than `blob_grace_s`; how many of each by table."""
    deleted = await delete_expired(database, now() if at is None else at)
    deleted["blobs"] = await blobs.sweep(grace_s=blob_grace_s)
    return deleted


async def sweep_periodically(database: Database, blobs: BlobStore, settings: StateSettings) -> None:
    """A sweep at start and every --state-sweep-interval-s; a failed sweep is logged and the
    next one tries again (several processes or replicas sweeping at once do no harm: each
    deletes what it finds)."""
    while True:
        try:
            deleted = await sweep(database, blobs)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("state sweep failed; retrying in %g s", settings.state_sweep_interval_s)
        else:
            if any(deleted.values()):
                log.info(
                    "state sweep deleted %s",
                    ", ".join(f"{count} {name}" for name, count in deleted.items() if count),
                )
        await asyncio.sleep(settings.state_sweep_interval_s)
