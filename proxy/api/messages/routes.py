"""`POST /v1/messages` (Anthropic's Messages API): the request translated into the internal
request (proxy/api/messages/protocol.py) and run through the shared request path; the chunks
rendered as a `message` or as Anthropic's typed events. Its errors are Anthropic's envelope:
the route declares `error_body` (proxy/app.py ROUTES)."""

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
from .protocol import MessageRenderer, parse_messages_request


async def create_message(request: web.Request) -> web.StreamResponse:
    call = parse_messages_request(await read_json_object(request))
    chat = parse_chat_request(call.chat_body, call.paths)  # errors name the Messages paths
    note_request_fields(request, chat)  # metadata.user_id, logged as chat's `user`
    generation = await start_generation(request, chat)
    renderer = MessageRenderer(
        call, generation.served_name, generation.usage, generation.tool_calls
    )
    chunks = generation.chunks
    # Closing the generator is what cancels the Triton stream when the client goes away.
    with request.app[MODEL_LIMITS_KEY].forgotten_on_outage(generation.triton_model):
        async with contextlib.aclosing(chunks):
            if not chat.is_stream:
                body = await renderer.collect(chunks)
                return web.json_response(body, dumps=json_dumps)
            # An error before the first chunk is still a plain HTTP error, as in chat.
            first = await anext(chunks, None)
            events = renderer.events(first, chunks, request[REQUEST_ID_KEY])
            return await write_events(request, events, SSE_HEADERS)
