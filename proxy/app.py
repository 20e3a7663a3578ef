"""The aiohttp application: OpenAI-compatible routes over a `Backend`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .admission import with_stream_timeouts
from .backend import Backend, GenerationChunk
from .config import ProxyConfig
from .error_catalogue import (
    INVALID_BODY,
    INVALID_JSON,
    MODEL_NOT_FOUND,
    MODEL_NOT_LOADED,
    MODEL_NOT_READY,
)
from .errors import REQUEST_ID_KEY, error_middleware, json_dumps
from .fetch import GuardedFetcher
from .hardening import install_hardening
from .limits import RequestLimits, check_chat, check_json_text, check_media
from .loader import ModelLoader
from .media import MediaFetcher
from .metrics import METRICS_KEY, METRICS_PATH, ProxyMetrics, metrics_handler
from .model_contract import ModelLimits
from .model_limits import ModelLimitsBook, narrower
from .observe import (
    load_media_timed,
    observe_generation,
    observe_request,
    timed_media_check,
)
from .responses import CompletionIdentity, TokenUsage, collect_completion, completion_events
from .responses_api import STORED_HEADERS, parse_responses_request
from .schema import ChatCompletionRequest, parse_chat_request
from .translate import ServerLimits, prepare_chat
from .upstreams import Upstreams, parse_targets

log = logging.getLogger("proxy")

CONFIG_KEY = web.AppKey("config", ProxyConfig)
BACKEND_KEY = web.AppKey("backend", Backend)
MODEL_LIMITS_KEY = web.AppKey("model_limits", ModelLimitsBook)
FETCHER_KEY = web.AppKey("fetcher", MediaFetcher)  # absent: remote media fetch disabled
LOADER_KEY = web.AppKey("loader", ModelLoader)  # present only with --lazy-load
STARTED_AT_KEY = web.AppKey("started_at", int)
USAGE_KEY = web.RequestKey("usage", TokenUsage)
IGNORED_FIELDS_KEY = web.RequestKey("ignored_fields", list)

# A caller's X-Request-Id is reused (it ties gateway, proxy and Triton logs together) only
# when it is short and plain enough to be safe in logs and headers.
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
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


def create_app(
    config: ProxyConfig,
    backend: Backend | None = None,
    *,
    fetcher: MediaFetcher | None = None,
) -> web.Application:
    """The proxy application; without `backend` it connects to Triton at startup.

    `fetcher` replaces the guarded image fetcher built from `config` (tests); with
    `config.fetch.enabled` false there is none either way.
    """
    app = web.Application(
        client_max_size=config.admission.max_request_bytes,
        middlewares=[request_log_middleware, error_middleware],
    )
    app[CONFIG_KEY] = config
    app[STARTED_AT_KEY] = int(time.time())
    app[METRICS_KEY] = ProxyMetrics()
    if config.fetch.enabled:
        app[FETCHER_KEY] = fetcher or GuardedFetcher(config.fetch)
    if backend is not None:
        app[BACKEND_KEY] = backend
    app.cleanup_ctx.append(backend_context)
    app.on_response_prepare.append(add_response_headers)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/models", list_models)
    # Served names may contain "/" (e.g. Hugging Face ids).
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get(METRICS_PATH, metrics_handler)
    install_hardening(app, config)
    return app


async def backend_context(app: web.Application) -> AsyncIterator[None]:
    # The gRPC channel binds to the running event loop, so it is made here, not in create_app.
    config = app[CONFIG_KEY]
    if BACKEND_KEY not in app:
        outcomes = app[METRICS_KEY].upstream_requests
        app[BACKEND_KEY] = Upstreams(
            parse_targets(config.server.triton_url),
            observe=lambda upstream, outcome: outcomes.labels(upstream, outcome).inc(),
        )
    book = app[MODEL_LIMITS_KEY] = ModelLimitsBook(app[BACKEND_KEY])
    if config.server.lazy_load:
        app[LOADER_KEY] = ModelLoader(app[BACKEND_KEY], config.server.load_timeout_s)
        prefetch = None  # unloaded models cannot answer; the first request loads and asks
    else:
        prefetch = asyncio.create_task(
            book.prefetch(list(dict.fromkeys(config.served_models.values())))
        )
    if config.fetch.allow_private_hosts:
        log.warning(
            "image fetch may reach private addresses of %s (a test-only setting)",
            ", ".join(config.fetch.allow_private_hosts),
        )
    yield
    if prefetch is not None:
        prefetch.cancel()
    if LOADER_KEY in app:
        await app[LOADER_KEY].close()
    await app[BACKEND_KEY].close()


# ---- request bookkeeping ---------------------------------------------------------------


@web.middleware
async def request_log_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The request id, then one log line and the request metrics (proxy/observe.py); the
    outermost middleware, so it sees every answer, errors rendered by the others included."""
    request[REQUEST_ID_KEY] = _request_id(request)
    return await observe_request(request, handler)


def _request_id(request: web.Request) -> str:
    caller_id = request.headers.get("X-Request-Id", "")
    if _CALLER_REQUEST_ID.fullmatch(caller_id):
        return caller_id
    return uuid.uuid4().hex


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID_KEY in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
    if request.get(IGNORED_FIELDS_KEY):
        response.headers["X-Ignored-Fields"] = ignored_fields_header(request[IGNORED_FIELDS_KEY])


def ignored_fields_header(names: list[str]) -> str:
    listed = [_HEADER_UNSAFE.sub("?", name)[:64] for name in names[:_MAX_IGNORED_LISTED]]
    if len(names) > _MAX_IGNORED_LISTED:
        listed.append(f"... ({len(names) - _MAX_IGNORED_LISTED} more)")
    return ", ".join(listed)


# ---- chat completions ------------------------------------------------------------------


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
                    request, chunks, identity, usage, chat, parse_tool_calls
                )
            body = await collect_completion(
                chunks, identity, usage, chat.wants_logprobs, parse_tool_calls
            )
            return web.json_response(body, dumps=json_dumps)


@dataclass
class Generation:
    """A chat request admitted and sent to Triton: its chunks, as observed and timed."""

    served_name: str
    triton_model: str
    usage: TokenUsage
    tool_calls: bool  # the output may hold tool calls to parse
    chunks: AsyncGenerator[GenerationChunk, None]


async def start_generation(request: web.Request, chat: ChatCompletionRequest) -> Generation:
    """The steps every route that generates shares (chat completions, responses): the model,
    its limits, the checks, translation, media, and the Triton stream with its timeouts and
    observation. Nothing is sent to Triton until the generator is first awaited."""
    app = request.app
    served_name, triton_model = resolve_model(app[CONFIG_KEY], chat.model)
    limits, translation = await limits_for(app, triton_model)
    check_chat(chat, limits)
    prepared = prepare_chat(chat, translation, limits)
    media = await load_media_timed(request, prepared.media, app.get(FETCHER_KEY))
    await timed_media_check(request, check_media(media, prepared.media, limits))
    triton_request = prepared.to_triton(triton_model, media)
    usage = request[USAGE_KEY] = TokenUsage()
    chunks = observe_generation(
        request,
        with_stream_timeouts(
            request, app[BACKEND_KEY].generate(triton_request, request[REQUEST_ID_KEY])
        ),
        model=served_name,
        stream=chat.is_stream,
        usage=usage,
    )
    return Generation(served_name, triton_model, usage, prepared.parse_tool_calls, chunks)


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


def resolve_model(config: ProxyConfig, requested: str | None) -> tuple[str, str]:
    """(served name, Triton model) for a request's `model`; no model means the default."""
    served = config.served_models
    name = config.server.served_model_name if requested is None else requested
    if name not in served:
        names = ", ".join(f"`{n}`" for n in served)
        raise MODEL_NOT_FOUND(
            "model", message=f"The model `{name}` does not exist. This server serves {names}."
        )
    return name, served[name]


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


async def stream_completion(
    request: web.Request,
    chunks: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    chat: ChatCompletionRequest,
    parse_tool_calls: bool = False,
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
    )
    return await write_events(request, events, SSE_HEADERS)


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


# ---- responses (OpenAI's Responses API, stateless: proxy/responses_api.py) ----------------


async def create_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`: the request translated into a chat completion's body and run
    through the chat path above; the chunks rendered as Responses objects and events."""
    app = request.app
    call = parse_responses_request(await read_json_object(request))
    note_request_fields(request, call)  # type: ignore[arg-type]  # user + ignored_fields
    with call.client_paths():  # the chat path's errors name the client's Responses paths
        chat = parse_chat_request(call.chat_body)
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


# ---- models and probes -----------------------------------------------------------------


def model_card(app: web.Application, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": app[STARTED_AT_KEY],
        "owned_by": "triton",
    }
    # vLLM's field: the context one request can use, once the model has told it.
    known = app[MODEL_LIMITS_KEY].known(app[CONFIG_KEY].served_models[name])
    if known is not None and known.context_length > 0:
        card["max_model_len"] = known.context_length
    return card


async def served_models(app: web.Application) -> list[str]:
    """Served names whose Triton model is in Triton's repository (loaded or not, so lazily
    loaded models are listed); the configured names when Triton cannot be asked."""
    served = app[CONFIG_KEY].served_models
    try:
        index = await app[BACKEND_KEY].repository_index()
    except Exception as exc:  # listing models must not fail because Triton is busy or down
        log.warning("Triton's model repository index is unavailable (%r); listing all", exc)
        return list(served)
    return [name for name, triton_model in served.items() if triton_model in index]


async def list_models(request: web.Request) -> web.Response:
    names = await served_models(request.app)
    cards = [model_card(request.app, name) for name in names]
    return web.json_response({"object": "list", "data": cards})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in await served_models(request.app):
        raise MODEL_NOT_FOUND("model", message=f"The model `{name}` does not exist.")
    return web.json_response(model_card(request.app, name))


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP; says nothing about Triton."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: Triton reports the default model loaded, so completions can be served.

    With --lazy-load, a model nobody has asked for yet is "not loaded" (503) until the first
    chat request loads it.
    """
    app = request.app
    model = app[CONFIG_KEY].server.triton_model
    if await app[BACKEND_KEY].is_ready(model):
        return web.json_response({"status": "ready"})
    if LOADER_KEY in app and not app[LOADER_KEY].is_loaded(model):
        raise MODEL_NOT_LOADED()
    raise MODEL_NOT_READY()
