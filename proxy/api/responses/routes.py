"""OpenAI's Responses API: `POST /v1/responses` and, for stored responses,
`GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`
and `POST /v1/responses/{id}/cancel`.

A request is translated into a chat completion's body (proxy/api/responses/protocol.py) and
run through the shared request path; the chunks are rendered as Responses objects and events.
With `store` (the default, when the proxy keeps state: proxy/state/context.py) the response is
stored (proxy/state/responses.py) before its answer, or its terminal event, goes out, so its id
works at once as `previous_response_id`; that field puts the stored conversation before the
request's input (proxy/api/responses/conversation.py). `background` responses are generated
by a task of the app (proxy/api/responses/background.py).

Stored responses belong to the caller's API key (proxy/state/tenancy.py): another key's id
answers exactly as an unknown id (404), as does an expired one.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from aiohttp import web

from ...error_catalogue import (
    CONVERSATION_TOO_LONG,
    INVALID_VALUE,
    PREVIOUS_RESPONSE_NOT_FOUND,
    RATE_LIMIT_EXCEEDED,
    RESPONSE_NOT_CANCELLABLE,
    RESPONSE_NOT_FOUND,
    STATE_DISABLED,
    UNSUPPORTED_PARAMETER,
)
from ...errors import REQUEST_ID_KEY, json_dumps
from ...keys import BLOBS_KEY, CONFIG_KEY, DATABASE_KEY, MODEL_LIMITS_KEY
from ...request.detached import BACKGROUND_ROUTE, DetachedRequest
from ...request.generation import (
    SSE_HEADERS,
    Generation,
    note_request_fields,
    read_json_object,
    start_generation,
    write_events,
)
from ...request.schema import ChatCompletionRequest, parse_chat_request
from ...serving.admission import ADMISSION_KEY
from ...state.context import require_state
from ...state.db import now
from ...state.files import FileStore
from ...state.responses import (
    CANCELLED,
    RUNNING,
    ConversationTooLong,
    NewResponse,
    PreviousNotFinished,
    ResponseStore,
)
from ...state.tenancy import request_tenant
from .background import BACKGROUND_KEY, run_background
from .conversation import (
    history_input,
    image_parts,
    listed_input_items,
    resolve_file_images,
    stored_input_items,
)
from .protocol import (
    HISTORY_PATH,
    STORED_HEADER,
    ResponsesCall,
    ResponsesRequest,
    validate_responses_request,
)

log = logging.getLogger("proxy")

STORED_RESPONSES = "stored responses"  # what --no-state makes unavailable (its 501)
# What an id of this proxy looks like (`resp_<hex>`, the column's width); anything else is
# unknown without asking the database.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ECHOED_ID = 64
# OpenAI's input-item pages: 1 to 100 items, 20 unless asked.
DEFAULT_PAGE, MAX_PAGE = 20, 100


def _store(app: web.Application) -> ResponseStore | None:
    if DATABASE_KEY not in app:
        return None
    return ResponseStore(app[DATABASE_KEY], app[BLOBS_KEY])


def _files(app: web.Application) -> FileStore | None:
    if DATABASE_KEY not in app:
        return None
    return FileStore(app[DATABASE_KEY], app[BLOBS_KEY], app[CONFIG_KEY].state)


def _stored(request: web.Request) -> ResponseStore:
    """The store for the stored-response routes; 501 without state."""
    database, blobs = require_state(request, STORED_RESPONSES)
    return ResponseStore(database, blobs)


# ---- POST /v1/responses ----------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    app = request.app
    r = validate_responses_request(await read_json_object(request))
    note_request_fields(request, r)  # type: ignore[arg-type]  # user + ignored_fields
    store = _store(app)
    if store is None and (r.previous_response_id is not None or r.background):
        raise STATE_DISABLED(
            "previous_response_id" if r.previous_response_id is not None else "background",
            what=STORED_RESPONSES,
        )
    tenant = request_tenant(request)
    await resolve_file_images(r, _files(app), tenant, app[CONFIG_KEY].limits.max_image_bytes)
    history: list[Any] = []
    if store is not None and r.previous_response_id is not None:
        history = await _history(app, store, tenant, r.previous_response_id)
    call = ResponsesCall(r, history)
    call.store = call.store and store is not None
    chat = parse_chat_request(call.chat_body, call.paths)  # errors name Responses paths
    if r.background:
        assert store is not None
        return await _create_background(request, store, tenant, call, chat)
    generation = await start_generation(request, chat)
    renderer = call.renderer(generation.served_name, generation.usage, generation.tool_calls)
    media = _own_media(r, generation)

    async def keep(body: dict[str, Any]) -> None:
        assert store is not None
        await _keep(app, store, tenant, call, body, media)

    on_done = keep if call.store else None
    headers = {STORED_HEADER: "true" if call.store else "false"}
    chunks = generation.chunks
    # Closing the generator is what cancels the Triton stream when the client goes away.
    with app[MODEL_LIMITS_KEY].forgotten_on_outage(generation.triton_model):
        async with contextlib.aclosing(chunks):
            if not chat.is_stream:
                body = await renderer.collect(chunks)
                if on_done is not None:
                    await on_done(body)
                return web.json_response(body, headers=headers, dumps=json_dumps)
            # An error before the first chunk is still a plain HTTP error, as in chat.
            first = await anext(chunks, None)
            events = renderer.events(first, chunks, request[REQUEST_ID_KEY], on_done)
            return await write_events(request, events, {**SSE_HEADERS, **headers})


def _own_media(r: ResponsesRequest, generation: Generation) -> list[bytes]:
    """The bytes of the request's own images: the last of the request's media, after those of
    the stored conversation before it."""
    count = sum(1 for _ in image_parts(r))
    return generation.media[len(generation.media) - count :] if count else []


async def _history(
    app: web.Application, store: ResponseStore, tenant: str, previous_id: str
) -> list[Any]:
    """The stored conversation `previous_id` ends, as input items (images read back)."""
    config = app[CONFIG_KEY]
    bounds = config.responses
    if not _ID.fullmatch(previous_id):
        raise PREVIOUS_RESPONSE_NOT_FOUND(HISTORY_PATH, id=previous_id[:_MAX_ECHOED_ID])
    try:
        turns = await store.history(
            tenant,
            previous_id,
            now(),
            max_turns=bounds.max_history_turns,
            max_bytes=bounds.max_history_bytes,
        )
    except ConversationTooLong as exc:
        log.info(
            "previous_response_id %s: %d turns, %d bytes: over the bounds",
            previous_id,
            exc.turns,
            exc.stored_bytes,
        )
        raise CONVERSATION_TOO_LONG(
            HISTORY_PATH,
            max_turns=bounds.max_history_turns,
            max_bytes=bounds.max_history_bytes,
        ) from None
    except PreviousNotFinished as exc:
        raise INVALID_VALUE(
            HISTORY_PATH,
            message=f"Previous response with id '{previous_id}' is {exc.status}; continue "
            "from it once it has finished.",
        ) from None
    if turns is None:
        raise PREVIOUS_RESPONSE_NOT_FOUND(HISTORY_PATH, id=previous_id)
    return await history_input(turns, store.blobs, config.limits.max_image_bytes)


async def _keep(
    app: web.Application,
    store: ResponseStore,
    tenant: str,
    call: ResponsesCall,
    body: dict[str, Any],
    media: list[bytes],
    owner: str | None = None,
) -> None:
    """Stores the response `body` with the request's input items and images."""
    items, images = stored_input_items(call.request, media)
    created = now()
    await store.create(
        NewResponse(
            id=body["id"],
            tenant=tenant,
            body=body,
            input_items=items,
            images=images,
            created_at=created,
            expires_at=app[CONFIG_KEY].state.expires_at(created),
            background=bool(call.request.background),
            previous_response_id=call.request.previous_response_id,
            owner=owner,
        )
    )


async def _create_background(
    request: web.Request,
    store: ResponseStore,
    tenant: str,
    call: ResponsesCall,
    chat: ChatCompletionRequest,
) -> web.Response:
    """Checks and prepares the request now (its errors are this answer's), stores it queued,
    and hands the generation to a task of the app, with an in-flight slot of its own."""
    app = request.app
    admission = app[ADMISSION_KEY]
    detached = DetachedRequest(app, request_id=request[REQUEST_ID_KEY], route=BACKGROUND_ROUTE)
    generation = await start_generation(detached.as_request, chat)
    renderer = call.renderer(generation.served_name, generation.usage, generation.tool_calls)
    queued = renderer.response("queued", [], finished=False)
    runner = app[BACKGROUND_KEY]
    if not admission.try_enter():
        await generation.chunks.aclose()
        raise RATE_LIMIT_EXCEEDED(capacity=admission.settings.max_concurrent_requests)
    try:
        await _keep(
            app, store, tenant, call, queued, _own_media(call.request, generation), runner.owner
        )
    except BaseException:
        admission.leave()
        await generation.chunks.aclose()
        raise
    runner.start(renderer.id, run_background(detached, store, renderer, generation))
    return web.json_response(queued, headers={STORED_HEADER: "true"}, dumps=json_dumps)


# ---- the stored responses --------------------------------------------------------------


async def _found(request: web.Request, store: ResponseStore) -> Any:
    response_id = request.match_info["response_id"]
    found = None
    if _ID.fullmatch(response_id):
        found = await store.get(request_tenant(request), response_id, now())
    if found is None:
        raise RESPONSE_NOT_FOUND(id=response_id[:_MAX_ECHOED_ID])
    return found


async def retrieve_response(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}`: the response object as stored (a background one as it
    stands: queued, in_progress, or finished)."""
    store = _stored(request)
    if request.query.get("stream", "").lower() in ("true", "1"):
        raise UNSUPPORTED_PARAMETER(
            "stream",
            message="'stream' is not supported here: a background response's events are not "
            "kept; poll without it.",
        )
    found = await _found(request, store)
    return web.json_response(found.body, dumps=json_dumps)


async def delete_response(request: web.Request) -> web.Response:
    """`DELETE /v1/responses/{id}`: gone with its input items; a running background one is
    stopped (its images go once no other response refers to them: the blob sweep)."""
    store = _stored(request)
    found = await _found(request, store)
    if await store.delete(request_tenant(request), found.id, now()):
        if found.status in RUNNING and BACKGROUND_KEY in request.app:
            request.app[BACKGROUND_KEY].stop(found.id)
    return web.json_response({"id": found.id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}/input_items`: the request's input items, a page at a time
    (`after` an item id, `limit` 1 to 100, `order` desc by default), OpenAI's list shape."""
    store = _stored(request)
    query = request.query
    limit_text = query.get("limit", str(DEFAULT_PAGE))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
        raise INVALID_VALUE(
            "limit",
            message=f"Invalid value for 'limit': expected an integer from 1 to {MAX_PAGE}.",
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise INVALID_VALUE("order", message="Invalid value for 'order': expected 'asc' or 'desc'.")
    found = await _found(request, store)
    page = await store.input_items(
        request_tenant(request),
        found.id,
        now(),
        after=query.get("after"),
        limit=int(limit_text),
        order=order,
    )
    if page is None:  # deleted or expired since
        raise RESPONSE_NOT_FOUND(id=found.id)
    items, has_more = page
    data = await listed_input_items(
        items, store.blobs, request.app[CONFIG_KEY].limits.max_image_bytes
    )
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return web.json_response(body, dumps=json_dumps)


async def cancel_response(request: web.Request) -> web.Response:
    """`POST /v1/responses/{id}/cancel`: a queued or running background response becomes
    `cancelled` and its generation stops (here, or on the replica running it within the
    lease's heartbeat); cancelling a cancelled one answers it again."""
    store = _stored(request)
    found = await _found(request, store)
    if not found.background:
        raise RESPONSE_NOT_CANCELLABLE(message="Cannot cancel a synchronous response.")
    if found.status in RUNNING:
        cancelled = {**found.body, "status": CANCELLED}
        if await store.update(found.id, cancelled):
            if BACKGROUND_KEY in request.app:
                request.app[BACKGROUND_KEY].stop(found.id)
            return web.json_response(cancelled, dumps=json_dumps)
        found = await _found(request, store)  # it ended meanwhile
    if found.status == CANCELLED:
        return web.json_response(found.body, dumps=json_dumps)
    raise RESPONSE_NOT_CANCELLABLE(
        message=f"Cannot cancel a response that is already {found.status}."
    )
