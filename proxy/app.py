"""The aiohttp application: OpenAI-compatible routes over a `Backend`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiohttp import web

from .backend import Backend, GenerationChunk, TritonBackend
from .config import ProxyConfig
from .errors import (
    REQUEST_ID_KEY,
    SERVICE_UNAVAILABLE,
    APIError,
    error_middleware,
    internal_error,
    json_dumps,
)
from .schema import parse_chat_request
from .sse import DONE_EVENT, sse_error, sse_event
from .translate import (
    CompletionIdentity,
    TokenUsage,
    chunk_body,
    completion_body,
    to_triton_request,
    usage_chunk_body,
)

log = logging.getLogger("proxy")

CONFIG_KEY = web.AppKey("config", ProxyConfig)
BACKEND_KEY = web.AppKey("backend", Backend)
STARTED_AT_KEY = web.AppKey("started_at", int)
USAGE_KEY = web.RequestKey("usage", TokenUsage)

# A caller's X-Request-Id is reused (it ties gateway, proxy and Triton logs together) only
# when it is short and plain enough to be safe in logs and headers.
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

SSE_HEADERS = {
    # Without the charset, `requests` decodes text/* as ISO-8859-1 and garbles Chinese;
    # Flask (the server this replaces) also sent it.
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tells nginx-style reverse proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def create_app(config: ProxyConfig, backend: Backend | None = None) -> web.Application:
    """The proxy application; without `backend` it connects to Triton at startup."""
    app = web.Application(
        client_max_size=config.max_request_bytes,
        middlewares=[request_log_middleware, error_middleware],
    )
    app[CONFIG_KEY] = config
    app[STARTED_AT_KEY] = int(time.time())
    if backend is not None:
        app[BACKEND_KEY] = backend
    app.cleanup_ctx.append(backend_context)
    app.on_response_prepare.append(add_request_id_header)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    # Served names may contain "/" (e.g. Hugging Face ids).
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


async def backend_context(app: web.Application) -> AsyncIterator[None]:
    # The gRPC channel binds to the running event loop, so it is made here, not in create_app.
    if BACKEND_KEY not in app:
        config = app[CONFIG_KEY]
        app[BACKEND_KEY] = TritonBackend(config.triton_url, config.triton_model)
    yield
    await app[BACKEND_KEY].close()


# ---- request bookkeeping ---------------------------------------------------------------


@web.middleware
async def request_log_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    request[REQUEST_ID_KEY] = _request_id(request)
    started = time.monotonic()
    status: int | str = "failed"
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = "cancelled (client disconnected)"
        raise
    finally:
        usage = request.get(USAGE_KEY)
        log.info(
            "request %s %s %s -> %s prompt_tokens=%s completion_tokens=%s %.1f ms",
            request[REQUEST_ID_KEY],
            request.method,
            request.path,
            status,
            usage.prompt_tokens if usage else "-",
            usage.completion_tokens if usage else "-",
            (time.monotonic() - started) * 1000,
        )


def _request_id(request: web.Request) -> str:
    caller_id = request.headers.get("X-Request-Id", "")
    if _CALLER_REQUEST_ID.fullmatch(caller_id):
        return caller_id
    return uuid.uuid4().hex


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID_KEY in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]


# ---- chat completions ------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    chat = parse_chat_request(await read_json_object(request), config.served_model_name)
    triton_request = to_triton_request(chat)
    identity = CompletionIdentity.new(config.served_model_name)
    usage = request[USAGE_KEY] = TokenUsage()
    chunks = request.app[BACKEND_KEY].generate(triton_request, request[REQUEST_ID_KEY])
    # Closing the generator is what cancels the Triton stream when the client goes away.
    async with contextlib.aclosing(chunks):
        if chat.is_stream:
            return await stream_completion(request, chunks, identity, usage, chat.include_usage)
        return await collect_completion(chunks, identity, usage)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError(
            400,
            "We could not parse the JSON body of your request. Send valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
    return body


async def collect_completion(
    chunks: AsyncIterator[GenerationChunk], identity: CompletionIdentity, usage: TokenUsage
) -> web.Response:
    texts = []
    finish_reason = "stop"
    async for chunk in chunks:
        record_usage(usage, chunk)
        texts.append(chunk.text)
        finish_reason = chunk.finish_reason or finish_reason
    body = completion_body(identity, "".join(texts), finish_reason, usage)
    return web.json_response(body, dumps=json_dumps)


async def stream_completion(
    request: web.Request,
    chunks: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    include_usage: bool,
) -> web.StreamResponse:
    # Waiting for the first chunk before sending headers lets an early failure (model
    # rejects the request, Triton down) reach the client as a real HTTP error status.
    first = await anext(chunks, None)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    events = completion_events(
        first, chunks, identity, usage, include_usage, request[REQUEST_ID_KEY]
    )
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            log.info("request %s: client disconnected", request[REQUEST_ID_KEY])
    return response


async def completion_events(
    first: GenerationChunk | None,
    rest: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    include_usage: bool,
    request_id: str,
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one streamed completion, errors included, ending with [DONE]."""
    role_delta = {"role": "assistant", "content": ""}
    yield sse_event(chunk_body(identity, role_delta, include_usage=include_usage))
    finish_reason = "stop"
    try:
        async for chunk in _prepend(first, rest):
            record_usage(usage, chunk)
            finish_reason = chunk.finish_reason or finish_reason
            if chunk.text:
                delta = {"content": chunk.text}
                yield sse_event(chunk_body(identity, delta, include_usage=include_usage))
    except APIError as exc:
        log.warning("request %s: failed mid-stream: %s %s", request_id, exc.status, exc.message)
        yield sse_error(exc)
        return
    except Exception:
        log.exception("request %s: failed mid-stream", request_id)
        yield sse_error(internal_error(request_id))
        return
    yield sse_event(chunk_body(identity, {}, finish_reason, include_usage=include_usage))
    if include_usage:
        yield sse_event(usage_chunk_body(identity, usage))
    yield DONE_EVENT


async def _prepend(
    first: GenerationChunk | None, rest: AsyncIterator[GenerationChunk]
) -> AsyncIterator[GenerationChunk]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


def record_usage(usage: TokenUsage, chunk: GenerationChunk) -> None:
    if chunk.prompt_tokens is not None:
        usage.prompt_tokens = chunk.prompt_tokens
    usage.completion_tokens += chunk.completion_tokens


# ---- models and probes -----------------------------------------------------------------


def model_card(app: web.Application) -> dict[str, Any]:
    return {
        "id": app[CONFIG_KEY].served_model_name,
        "object": "model",
        "created": app[STARTED_AT_KEY],
        "owned_by": "triton",
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [model_card(request.app)]})


async def retrieve_model(request: web.Request) -> web.Response:
    card = model_card(request.app)
    if request.match_info["model"] != card["id"]:
        raise APIError(
            404,
            f"The model `{request.match_info['model']}` does not exist.",
            param="model",
            code="model_not_found",
        )
    return web.json_response(card)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP; says nothing about Triton."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: Triton reports the model loaded, so completions can be served."""
    if not await request.app[BACKEND_KEY].is_ready():
        raise APIError(
            503,
            "The model is not ready to serve requests.",
            type=SERVICE_UNAVAILABLE,
            code="model_not_ready",
        )
    return web.json_response({"status": "ready"})
