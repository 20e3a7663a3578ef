"""The aiohttp application: the app factory, its route table and the request bookkeeping
every route gets (request id, log line, metrics).

`ROUTES` is every route the proxy serves, each with its policy (proxy/serving/routes.py):
whether it is admitted (cap, body timeout, deadline, draining), whether it needs the API
key. A route added anywhere else is neither, and tests/proxy/test_routes.py fails.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .api.batches.context import batch_context
from .api.batches.routes import cancel_batch, create_batch, list_batches, retrieve_batch
from .api.chat.routes import chat_completions
from .api.completions.routes import create_completion
from .api.files.routes import create_file, delete_file, file_content, list_files, retrieve_file
from .api.loras import load_lora_adapter, unload_lora_adapter
from .api.messages.protocol import error_body as anthropic_error_body
from .api.messages.routes import create_message
from .api.models import health, list_models, ready, retrieve_model
from .api.responses.background import background_context
from .api.responses.routes import (
    cancel_response,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from .api.tokenize.routes import detokenize, tokenize
from .config import ProxyConfig
from .errors import REQUEST_ID_KEY, error_middleware
from .keys import (
    BACKEND_KEY,
    CONFIG_KEY,
    FETCHER_KEY,
    IGNORED_FIELDS_KEY,
    LOADER_KEY,
    LORAS_KEY,
    MODEL_LIMITS_KEY,
    STARTED_AT_KEY,
)
from .media.decoding import decode_context
from .media.fetch import GuardedFetcher
from .media.kinds import MediaFetcher
from .observability.metrics import METRICS_KEY, METRICS_PATH, ProxyMetrics, metrics_handler
from .observability.observe import observe_request
from .observability.tracing import TRACING_KEY, Tracing
from .playground.routes import (
    playground_page,
    playground_script,
    playground_served,
    playground_styles,
)
from .request.generation import ignored_fields_header
from .serving.hardening import install_hardening
from .serving.routes import Admit, Auth, Route, register_routes
from .state.context import state_context
from .transport.backend import Backend
from .transport.loader import ModelLoader
from .transport.loras import LoraCatalog
from .transport.model_limits import ModelLimitsBook
from .transport.upstreams import Upstreams, parse_targets

log = logging.getLogger("proxy")

# The browser playground (proxy/playground/): a static page and its two files. They hold no
# data and a browser cannot send the key when it opens a page, so they are served without it
# (Auth.PAGE); the page's script sends the key on its API calls. Only with --playground
# (auto: on a loopback --host); otherwise they are left out of the app (served_routes).
PLAYGROUND_ROUTES = (
    Route("GET", "/playground", playground_page, auth=Auth.PAGE),
    Route("GET", "/playground/playground.js", playground_script, auth=Auth.PAGE),
    Route("GET", "/playground/playground.css", playground_styles, auth=Auth.PAGE),
)

ROUTES = (
    Route("POST", "/v1/chat/completions", chat_completions, admit=Admit.GENERATING),
    Route("POST", "/v1/responses", create_response, admit=Admit.GENERATING),
    Route("POST", "/v1/completions", create_completion, admit=Admit.GENERATING),
    # Anthropic's Messages API: its clients send the key as x-api-key, and read its errors.
    Route(
        "POST",
        "/v1/messages",
        create_message,
        admit=Admit.GENERATING,
        auth=Auth.X_API_KEY,
        error_body=anthropic_error_body,
    ),
    # Stored responses: reads are plain; a delete or a cancel changes stored state (WRITE).
    Route("GET", "/v1/responses/{response_id}", retrieve_response),
    Route("DELETE", "/v1/responses/{response_id}", delete_response, admit=Admit.WRITE),
    Route("GET", "/v1/responses/{response_id}/input_items", list_input_items),
    Route("POST", "/v1/responses/{response_id}/cancel", cancel_response, admit=Admit.WRITE),
    Route("POST", "/v1/batches", create_batch, admit=Admit.WRITE),
    Route("GET", "/v1/batches", list_batches),
    Route("GET", "/v1/batches/{batch_id}", retrieve_batch),
    Route("POST", "/v1/batches/{batch_id}/cancel", cancel_batch, admit=Admit.WRITE),
    # vLLM's: answered by the model (the prompt rendered as it would generate from it, no
    # generation), so admitted as generating requests are.
    Route("POST", "/tokenize", tokenize, admit=Admit.GENERATING),
    Route("POST", "/detokenize", detokenize, admit=Admit.GENERATING),
    Route("GET", "/v1/models", list_models),
    # Served names may contain "/" (e.g. Hugging Face ids).
    Route("GET", "/v1/models/{model:.+}", retrieve_model),
    # Files: an upload streams to storage under its own size limit and timed reads (UPLOAD);
    # a delete is a write (WRITE); neither takes a generating slot.
    Route("POST", "/v1/files", create_file, admit=Admit.UPLOAD),
    Route("GET", "/v1/files", list_files),
    Route("GET", "/v1/files/{file_id}", retrieve_file),
    Route("GET", "/v1/files/{file_id}/content", file_content),
    Route("DELETE", "/v1/files/{file_id}", delete_file, admit=Admit.WRITE),
    Route("GET", "/health", health, auth=Auth.PROBE),
    Route("GET", "/ready", ready, admit=Admit.READINESS, auth=Auth.PROBE),
    Route("GET", METRICS_PATH, metrics_handler, auth=Auth.SCRAPE, in_flight_gauge=False),
    *PLAYGROUND_ROUTES,
)

# vLLM's runtime LoRA endpoints: they change what every replica serves, so they take the admin
# key (--admin-api-key), never a client's, and exist only when one is set (ADMIN_ROUTES).
ADMIN_ROUTES = (
    Route("POST", "/v1/load_lora_adapter", load_lora_adapter, admit=Admit.WRITE, auth=Auth.ADMIN),
    Route(
        "POST", "/v1/unload_lora_adapter", unload_lora_adapter, admit=Admit.WRITE, auth=Auth.ADMIN
    ),
)

# A caller's X-Request-Id is reused (it ties gateway, proxy and Triton logs together) only
# when it is short and plain enough to be safe in logs and headers.
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(
    config: ProxyConfig,
    backend: Backend | None = None,
    *,
    fetcher: MediaFetcher | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """The proxy application; without `backend` it connects to Triton at startup.

    `fetcher` replaces the guarded image fetcher built from `config` (tests); with
    `config.fetch.enabled` false there is none either way. `tracing` replaces the tracer
    built from `config.tracing` (tests: an in-memory exporter).
    """
    app = web.Application(
        client_max_size=config.admission.max_request_bytes,
        middlewares=[request_log_middleware, error_middleware],
    )
    app[CONFIG_KEY] = config
    app[STARTED_AT_KEY] = int(time.time())
    app[METRICS_KEY] = ProxyMetrics()
    app[TRACING_KEY] = tracing or Tracing.from_settings(config.tracing)
    app.on_cleanup.append(_stop_tracing)
    if config.fetch.enabled:
        app[FETCHER_KEY] = fetcher or GuardedFetcher(config.fetch)
    if backend is not None:
        app[BACKEND_KEY] = backend
    app.cleanup_ctx.append(decode_context)  # decode workers start before the first request
    app.cleanup_ctx.append(backend_context)
    app.cleanup_ctx.append(state_context)
    app.cleanup_ctx.append(batch_context)  # after the database opens, stopped before it closes
    # After the database opens; at shutdown its generations end before the database closes.
    app.cleanup_ctx.append(background_context)
    app.on_response_prepare.append(add_response_headers)
    register_routes(app, served_routes(config))
    install_hardening(app, config)
    return app


def served_routes(config: ProxyConfig) -> tuple[Route, ...]:
    """The routes `config` serves: ROUTES but the playground's without it, and the admin
    routes with an admin key (without one they are 404: no key at all could open them)."""
    routes = (
        ROUTES
        if playground_served(config.server)
        else tuple(route for route in ROUTES if route not in PLAYGROUND_ROUTES)
    )
    return routes + ADMIN_ROUTES if config.server.admin_api_key else routes


async def backend_context(app: web.Application) -> AsyncIterator[None]:
    # The gRPC channel binds to the running event loop, so it is made here, not in create_app.
    config = app[CONFIG_KEY]
    if BACKEND_KEY not in app:
        app[BACKEND_KEY] = Upstreams(
            parse_targets(config.server.triton_url),
            routing=config.server.routing,
            **upstream_observers(app[METRICS_KEY]),
        )
    book = app[MODEL_LIMITS_KEY] = ModelLimitsBook(app[BACKEND_KEY])
    if config.server.lazy_load:
        loader = app[LOADER_KEY] = ModelLoader(app[BACKEND_KEY], config.server.load_timeout_s)
        prefetch = None  # unloaded models cannot answer; the first request loads and asks
    else:
        loader = None
        prefetch = asyncio.create_task(
            book.prefetch(list(dict.fromkeys(config.served_models.values())))
        )
    app[LORAS_KEY] = LoraCatalog(
        app[BACKEND_KEY],
        config.served_models,
        config.server.served_model_name,
        # an unloaded model cannot be asked for its adapters (and an adapter's name must not
        # load it: any client could)
        is_loaded=loader.is_loaded if loader is not None else lambda triton_model: True,
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


def upstream_observers(metrics: ProxyMetrics) -> dict[str, Any]:
    """Upstreams' callbacks into the per-upstream metrics."""

    def observe(upstream: str, outcome: str) -> None:
        metrics.upstream_requests.labels(upstream, outcome).inc()

    def observe_media(upstream: str, items: int, cache_hits: int) -> None:
        metrics.upstream_media.labels(upstream).inc(items)
        metrics.upstream_cache_hits.labels(upstream).inc(cache_hits)

    return {"observe": observe, "observe_media": observe_media}


async def _stop_tracing(app: web.Application) -> None:
    await asyncio.to_thread(app[TRACING_KEY].shutdown)  # exports what is left


@web.middleware
async def request_log_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The request id, then one log line and the request metrics (proxy/observability/observe.py); the
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
