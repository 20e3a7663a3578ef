"""What every generating route shares, whatever its API surface: reading the JSON body,
resolving the model and its limits, the checks, translation, media, the Triton stream with its
timeouts and observation, and writing an event stream."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import ProxyConfig
from ..error_catalogue import INVALID_BODY, INVALID_JSON, APIError
from ..errors import REQUEST_ID_KEY
from ..keys import (
    BACKEND_KEY,
    CONFIG_KEY,
    FETCHER_KEY,
    IGNORED_FIELDS_KEY,
    LOADER_KEY,
    LORAS_KEY,
    MODEL_LIMITS_KEY,
    USAGE_KEY,
)
from ..observability.observe import (
    RECORD_KEY,
    load_media_timed,
    observe_generation,
    timed_media_check,
)
from ..serving.admission import with_stream_timeouts
from ..transport.backend import DEFAULT_PROMPT_OPTIONS, GenerationChunk, PromptOptions
from ..transport.contract import ModelLimits, Priority, Task
from ..transport.loras import ResolvedModel
from ..transport.model_limits import narrower
from .limits import RequestLimits, check_chat, check_json_text, check_media
from .paths import CHAT_PATHS, ClientPaths
from .schema import ChatCompletionRequest
from .timings import timings_body
from .translate import PreparedChat, ServerLimits, prepare_chat
from .usage import TokenUsage

log = logging.getLogger("proxy")

# Ignored field names are the client's text: kept printable, short and few in a header.
_HEADER_UNSAFE = re.compile(r"[^\x21-\x7e]|,")

_MAX_IGNORED_LISTED = 32

SSE_HEADERS = {
    # Without the charset, `requests` decodes text/* as ISO-8859-1 and garbles Chinese;
    # Flask (the server this replaces) also sent it.
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tells nginx-style reverse proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
}


@dataclass
class Generation:
    """A chat request admitted and sent to Triton: its chunks, as observed and timed."""

    served_name: str
    triton_model: str
    usage: TokenUsage
    tool_calls: bool  # the output may hold tool calls to parse
    chunks: AsyncGenerator[GenerationChunk, None]
    # The encoded media the model gets, in order of appearance (fetched ones as fetched):
    # what a stored response keeps of its images (proxy/api/responses/conversation.py).
    media: list[bytes]
    # The request's stage timings for its response body once its chunks are in (the
    # `timings` field or --timings; proxy/request/timings.py); None: not asked for.
    timings: Callable[[], dict[str, float] | None] | None = None


async def start_generation(
    request: web.Request,
    chat: ChatCompletionRequest,
    *,
    priority: Priority | None = None,
    options: PromptOptions = DEFAULT_PROMPT_OPTIONS,
) -> Generation:
    """The steps every route that generates shares (chat completions, responses, completions):
    the model, its limits, the checks, translation, media, and the Triton stream with its
    timeouts and observation. Nothing is sent to Triton until the generator is first awaited.

    `priority`: the scheduling class the caller imposes whatever the request says (the Batch
    API runs its lines as `Priority.BATCH`); None: the request's own `priority` field.
    `options`: how the model renders the prompt and whether it echoes it."""
    app = request.app
    model, prepared, media = await _model_request(request, chat, priority)
    # the model measures the stages when asked: for this response's body, or for every
    # request's stage histograms (--timings)
    wants_timings = bool(chat.timings) or app[CONFIG_KEY].server.timings
    prepared = dataclasses.replace(prepared, timings=wants_timings)
    triton_request = dataclasses.replace(
        prepared.to_triton(model.triton_model, media), options=options, lora=model.lora
    )
    usage = request[USAGE_KEY] = TokenUsage()
    stream = app[BACKEND_KEY].generate(triton_request, request[REQUEST_ID_KEY])
    if chat.paths is not CHAT_PATHS:
        stream = _model_errors_in_client_paths(stream, chat.paths)
    chunks = observe_generation(
        request,
        with_stream_timeouts(request, stream),
        model=model.served_name,
        label=app[LORAS_KEY].metrics_label(model.served_name),
        stream=chat.is_stream,
        usage=usage,
    )
    timings = functools.partial(timings_body, request) if wants_timings else None
    return Generation(
        model.served_name,
        model.triton_model,
        usage,
        prepared.parse_tool_calls,
        chunks,
        media,
        timings,
    )


async def run_task(
    request: web.Request, chat: ChatCompletionRequest, task: Task, options: PromptOptions
) -> tuple[str, str]:
    """(served name, the model's answer) of a task other than generation (tokenize,
    detokenize): the model, its limits, the checks, translation and media as a generation
    has them (so the model renders the prompt as it would generate from it), then its one
    answer within the request's deadline."""
    model, prepared, media = await _model_request(request, chat, None)
    request[RECORD_KEY].model = model.served_name  # the request's log line names it
    triton_request = dataclasses.replace(
        prepared.to_triton(model.triton_model, media),
        task=task,
        options=options,
        stream=False,
        lora=model.lora,
    )
    stream = request.app[BACKEND_KEY].generate(triton_request, request[REQUEST_ID_KEY])
    if chat.paths is not CHAT_PATHS:
        stream = _model_errors_in_client_paths(stream, chat.paths)
    async with contextlib.aclosing(with_stream_timeouts(request, stream)) as chunks:
        answer = "".join([chunk.text async for chunk in chunks])
    return model.served_name, answer


async def _model_request(
    request: web.Request, chat: ChatCompletionRequest, priority: Priority | None
) -> tuple[ResolvedModel, PreparedChat, list[bytes]]:
    """(what `model` names, the request translated, its media's bytes): the model, its
    limits, the checks, translation and media."""
    app = request.app
    model = await resolve_model(app, chat.model)
    limits, translation = await limits_for(app, model.triton_model)
    check_chat(chat, limits)
    prepared = prepare_chat(chat, translation, limits)
    if priority is not None:
        prepared = dataclasses.replace(prepared, priority=priority)
    media = await load_media_timed(request, prepared.media, app.get(FETCHER_KEY))
    await timed_media_check(request, check_media(media, prepared.media, limits))
    return model, prepared, media


def report_usage(request: web.Request, usage: TokenUsage) -> None:
    """The request's usage when it is several generations' (a completions request of several
    prompts): what its metrics, its log line and the Batch API count."""
    request[USAGE_KEY] = usage
    request[RECORD_KEY].usage = usage


async def _model_errors_in_client_paths(
    chunks: AsyncGenerator[GenerationChunk, None], paths: ClientPaths
) -> AsyncGenerator[GenerationChunk, None]:
    """The model names the fields of the request it got, the internal request's; its errors
    enter the proxy here, and name the client's fields from here on."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as exc:
            exc.param = paths.optional(exc.param)
            raise


async def limits_for(app: web.Application, triton_model: str) -> tuple[RequestLimits, ServerLimits]:
    """What a request to `triton_model` is held to: the model's limits (it is asked through
    Triton; a lazily loaded model is loaded first, as only it knows them), narrowed by the
    proxy's flags."""
    if LOADER_KEY in app:
        await app[LOADER_KEY].ensure_loaded(triton_model)
    return effective_limits(app[CONFIG_KEY], await app[MODEL_LIMITS_KEY].get(triton_model))


@functools.lru_cache(maxsize=64)
def effective_limits(config: ProxyConfig, model: ModelLimits) -> tuple[RequestLimits, ServerLimits]:
    """The proxy's flags over a model's limits; the same pair for every request while both
    stay the same, so it is worked out once."""
    max_tokens = int(narrower(config.server.max_tokens_limit, model.max_tokens))
    translation = ServerLimits(config.pixels.within(model), max_tokens, model)
    return config.limits.within(model), translation


def note_request_fields(request: web.Request, chat: ChatCompletionRequest) -> None:
    """Logs the `user` and the unknown fields; the latter also go back in X-Ignored-Fields."""
    request_id = request[REQUEST_ID_KEY]
    if chat.user is not None:
        log.info("request %s: user=%r", request_id, chat.user[:256])
    if chat.ignored_fields:
        request[IGNORED_FIELDS_KEY] = chat.ignored_fields
        log.info(
            "request %s: ignored fields: %s",
            request_id,
            ", ".join(repr(name[:64]) for name in chat.ignored_fields[:_MAX_IGNORED_LISTED]),
        )


def ignored_fields_header(names: list[str]) -> str:
    listed = [_HEADER_UNSAFE.sub("?", name)[:64] for name in names[:_MAX_IGNORED_LISTED]]
    if len(names) > _MAX_IGNORED_LISTED:
        listed.append(f"... ({len(names) - _MAX_IGNORED_LISTED} more)")
    return ", ".join(listed)


async def resolve_model(app: web.Application, requested: str | None) -> ResolvedModel:
    """What a request's `model` names (a served name or a LoRA adapter; None: the default):
    the one seam every API surface resolves its model through (proxy/transport/loras.py)."""
    return await app[LORAS_KEY].resolve(requested)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's
        raise INVALID_JSON() from None
    if not isinstance(body, dict):
        raise INVALID_BODY()
    check_json_text(raw, body)
    return body


async def write_events(
    request: web.Request,
    events: AsyncGenerator[bytes, None],
    headers: dict[str, str],
) -> web.StreamResponse:
    """Sends the headers, then a stream's events (closing `events` whatever happens); a
    client gone mid-stream is logged, not an error."""
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            log.info("request %s: client disconnected", request[REQUEST_ID_KEY])
    return response
