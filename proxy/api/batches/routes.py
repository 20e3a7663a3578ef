"""OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches/{batch_id}`, `GET /v1/batches`
and `POST /v1/batches/{batch_id}/cancel`.

Creating a batch checks the request and the input file (the caller's, uploaded with purpose
`batch`) and stores the batch as `validating`; the runner (runner.py) does the rest, on this
process or any other on the same database. A batch belongs to the caller's API key
(proxy/state/tenancy.py): another key's id answers 404, exactly as an unknown one.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ...error_catalogue import (
    BATCH_NOT_CANCELLABLE,
    INVALID_TYPE,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    NO_SUCH_OBJECT,
)
from ...errors import json_dumps
from ...keys import CONFIG_KEY
from ...request.generation import read_json_object
from ...state.batches import COMPLETION_WINDOWS, ENDPOINTS, Batch, BatchStore, NotCancellable
from ...state.context import require_state
from ...state.files import BATCH_INPUT, FileStore
from ...state.tenancy import request_tenant
from .context import BATCH_RUNNER_KEY, BATCH_STORE_KEY

BATCHES = "batches"  # what --no-state makes unavailable (its 501)
# OpenAI's list pages: 1 to 100 batches, 20 unless asked.
DEFAULT_PAGE, MAX_PAGE = 20, 100
# OpenAI's metadata bounds: 16 pairs, keys up to 64 characters, values up to 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# An id of this proxy (`batch_<hex>`, the column's width); anything else is unknown at once.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ECHOED_ID = 64


def _store(request: web.Request) -> BatchStore:
    require_state(request, BATCHES)
    return request.app[BATCH_STORE_KEY]


def _not_found(batch_id: str) -> Exception:
    return NO_SUCH_OBJECT("batch_id", kind="Batch", id=batch_id[:_MAX_ECHOED_ID])


def _answer(batch: Batch) -> web.Response:
    return web.json_response(batch.to_openai(), dumps=json_dumps)


async def create_batch(request: web.Request) -> web.Response:
    database, blobs = require_state(request, BATCHES)
    store = request.app[BATCH_STORE_KEY]
    body = await read_json_object(request)
    input_file_id = _required_text(body, "input_file_id")
    endpoint = _required_text(body, "endpoint")
    if endpoint not in ENDPOINTS:
        raise INVALID_VALUE(
            "endpoint",
            message=f"endpoint must be one of {', '.join(ENDPOINTS)} (this server's), "
            f"not {endpoint[:80]!r}.",
        )
    window = _required_text(body, "completion_window")
    if window not in COMPLETION_WINDOWS:
        raise INVALID_VALUE(
            "completion_window",
            message=f"completion_window must be {', '.join(map(repr, COMPLETION_WINDOWS))}.",
        )
    metadata = _metadata(body.get("metadata"))
    tenant = request_tenant(request)
    settings = request.app[CONFIG_KEY].state
    stored = await FileStore(database, blobs, settings).get(tenant, input_file_id)
    if stored is None:
        raise NO_SUCH_OBJECT("input_file_id", kind="File", id=input_file_id[:_MAX_ECHOED_ID])
    if stored.purpose != BATCH_INPUT:
        raise INVALID_VALUE(
            "input_file_id",
            message=f"The file {input_file_id} was uploaded with purpose {stored.purpose!r}; "
            f"a batch's input file needs purpose {BATCH_INPUT!r}.",
        )
    batch = await store.create(
        tenant=tenant,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=window,
        metadata=metadata,
        retention_s=settings.state_retention_s,
    )
    request.app[BATCH_RUNNER_KEY].wake()  # validation starts here, now
    return _answer(batch)


def _required_text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise MISSING_REQUIRED_PARAMETER(name, path=name)
    if not isinstance(value, str):
        raise INVALID_TYPE(name, message=f"{name} must be a string.")
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise INVALID_TYPE("metadata", message="metadata must be an object of strings.")
    if len(value) > METADATA_PAIRS:
        raise INVALID_VALUE(
            "metadata", message=f"metadata may hold at most {METADATA_PAIRS} key-value pairs."
        )
    for key, text in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise INVALID_VALUE(
                "metadata",
                message=f"metadata keys are at most {METADATA_KEY_CHARS} characters.",
            )
        if not isinstance(text, str):
            raise INVALID_TYPE(f"metadata.{key}", message="metadata values must be strings.")
        if len(text) > METADATA_VALUE_CHARS:
            raise INVALID_VALUE(
                f"metadata.{key}",
                message=f"metadata values are at most {METADATA_VALUE_CHARS} characters.",
            )
    return value


async def retrieve_batch(request: web.Request) -> web.Response:
    store = _store(request)
    batch_id = request.match_info["batch_id"]
    batch = await store.get(request_tenant(request), batch_id) if _ID.fullmatch(batch_id) else None
    if batch is None:
        raise _not_found(batch_id)
    return _answer(batch)


async def list_batches(request: web.Request) -> web.Response:
    store = _store(request)
    limit = _limit(request.query.get("limit"))
    after = request.query.get("after") or None
    page = None
    if after is None or _ID.fullmatch(after):
        page = await store.page(request_tenant(request), after=after, limit=limit)
    if page is None:
        raise INVALID_VALUE("after", message=f"after: no batch {after[:_MAX_ECHOED_ID]!r}.")
    batches, has_more = page
    return web.json_response(
        {
            "object": "list",
            "data": [batch.to_openai() for batch in batches],
            "first_id": batches[0].id if batches else None,
            "last_id": batches[-1].id if batches else None,
            "has_more": has_more,
        },
        dumps=json_dumps,
    )


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise INVALID_VALUE("limit", message=f"limit must be an integer from 1 to {MAX_PAGE}.")
    return limit


async def cancel_batch(request: web.Request) -> web.Response:
    store = _store(request)
    batch_id = request.match_info["batch_id"]
    try:
        batch = (
            await store.request_cancel(request_tenant(request), batch_id)
            if _ID.fullmatch(batch_id)
            else None
        )
    except NotCancellable as exc:
        raise BATCH_NOT_CANCELLABLE("batch_id", status=exc.status) from None
    if batch is None:
        raise _not_found(batch_id)
    request.app[BATCH_RUNNER_KEY].wake()  # it ends the batch
    return _answer(batch)
