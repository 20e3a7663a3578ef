"""`POST /v1/responses` (OpenAI's Responses API, stateless): the request translated into a
chat completion's body (proxy/api/responses/protocol.py) and run through the shared request
path; the chunks rendered as Responses objects and events."""

from __future__ import annotations

import contextlib

from aiohttp import web

from ...errors import REQUEST_ID_KEY, json_dumps
from ...keys import MODEL_LIMITS_KEY
from ...request.generation import (
    SSE_HEADERS,
    note_request_fields,
    read_json_object,
    start_generation,
    write_events,
)
from ...request.schema import parse_chat_request
from .protocol import STORED_HEADERS, parse_responses_request


async def create_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`: the request translated into a chat completion's body and run
    through the chat path above; the chunks rendered as Responses objects and events."""
    app = request.app
    call = parse_responses_request(await read_json_object(request))
    note_request_fields(request, call)  # type: ignore[arg-type]  # user + ignored_fields
    chat = parse_chat_request(call.chat_body, call.paths)  # errors name Responses paths
    generation = await start_generation(request, chat)
    renderer = call.renderer(generation.served_name, generation.usage, generation.tool_calls)
    chunks = generation.chunks
    # Closing the generator is what cancels the Triton stream when the client goes away.
    with app[MODEL_LIMITS_KEY].forgotten_on_outage(generation.triton_model):
        async with contextlib.aclosing(chunks):
            if not chat.is_stream:
                body = await renderer.collect(chunks)
                return web.json_response(body, headers=STORED_HEADERS, dumps=json_dumps)
            # An error before the first chunk is still a plain HTTP error, as in chat.
            first = await anext(chunks, None)
            events = renderer.events(first, chunks, request[REQUEST_ID_KEY])
            return await write_events(request, events, {**SSE_HEADERS, **STORED_HEADERS})
