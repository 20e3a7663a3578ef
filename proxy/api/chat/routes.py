"""`POST /v1/chat/completions`: parse, generate (proxy/request/generation.py), then one
`chat.completion` body or a stream of `chat.completion.chunk` events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

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
from ...request.schema import ChatCompletionRequest, parse_chat_request
from ...request.usage import TokenUsage
from ...transport.backend import GenerationChunk
from .render import CompletionIdentity, collect_completion, completion_events


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat_request(await read_json_object(request))
    note_request_fields(request, chat)
    generation = await start_generation(request, chat)
    identity = CompletionIdentity.new(generation.served_name)
    chunks, usage, parse_tool_calls = generation.chunks, generation.usage, generation.tool_calls
    # Closing the generator is what cancels the Triton stream when the client goes away.
    with request.app[MODEL_LIMITS_KEY].forgotten_on_outage(generation.triton_model):
        async with contextlib.aclosing(chunks):
            if chat.is_stream:
                return await stream_completion(
                    request, chunks, identity, usage, chat, parse_tool_calls, generation.timings
                )
            body = await collect_completion(
                chunks, identity, usage, chat.wants_logprobs, parse_tool_calls, generation.timings
            )
            return web.json_response(body, dumps=json_dumps)


async def stream_completion(
    request: web.Request,
    chunks: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    chat: ChatCompletionRequest,
    parse_tool_calls: bool = False,
    timings: Callable[[], dict[str, float] | None] | None = None,
) -> web.StreamResponse:
    # Waiting for the first chunk before sending headers lets an early failure (model
    # rejects the request, Triton down) reach the client as a real HTTP error status.
    first = await anext(chunks, None)
    events = completion_events(
        first,
        chunks,
        identity,
        usage,
        request[REQUEST_ID_KEY],
        include_usage=chat.include_usage,
        with_logprobs=chat.wants_logprobs,
        parse_tool_calls=parse_tool_calls,
        continuous_usage=chat.continuous_usage,
        timings=timings,
    )
    return await write_events(request, events, SSE_HEADERS)
