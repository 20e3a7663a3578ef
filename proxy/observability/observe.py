"""Per-request observation: one `RequestRecord` per request feeds both its log line and the
metrics of proxy/observability/metrics.py.

- `observe_request` is the body of the request-log middleware (proxy/app.py), the outermost
  one: it times the request, keeps the in-flight gauge, and at the end counts the request,
  its tokens, its error cause or its cancellation, and logs one line.
- `observe_generation` wraps a completion's chunks: time to first token, gaps between
  chunks, the usage, errors raised mid-stream and early closes (client gone).
- `load_media_timed` and `timed_media_check` count a request's media parts by kind and
  source, and time fetching, decoding and checking them (by the request's media kind).
- `stage_timings` joins the stages the model measured for a request (when it was asked for
  them) with the proxy's own media fetch into the request's timings: its response body's
  `timings` when the client asked, and the per-stage histogram when the request ends.

An error's cause comes from one place, the error the client got (`error_cause` of its status
and code): the error middleware's (`ERROR_KEY`, whatever envelope its route's API writes), else
the `error.code` of an OpenAI envelope a handler wrote itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..api.chat.render import TokenUsage
from ..error_catalogue import INTERNAL_ERROR, APIError
from ..errors import ERROR_KEY, REQUEST_ID_KEY
from ..media.images import IMAGE
from ..media.kinds import MediaFetcher, MediaRef, load_media
from ..serving.routes import route_of
from ..transport.backend import GenerationChunk
from .metrics import (
    METHODS,
    METRICS_KEY,
    MIXED_MEDIA,
    STAGES,
    UNMATCHED_ROUTE,
    ProxyMetrics,
    error_cause,
)
from .tracing import (
    child_span,
    end_child,
    end_request_span,
    request_span,
    start_child,
)

access_log = logging.getLogger("proxy.access")

# nginx's "client closed request": the status label and log status of a request whose client
# disconnected before its response ended (a stream may already have sent 200).
CLIENT_CLOSED = 499
CLIENT_DISCONNECTED = "client_disconnected"
_MAX_LOGGED_PATH = 200
_MAX_ENVELOPE_BYTES = 64 * 1024


@dataclass
class RequestRecord:
    """What one request did, filled in as it goes."""

    request_id: str
    method: str
    path: str
    route: str
    started: float  # time.monotonic() at arrival
    model: str | None = None  # the served name, once a completion starts
    model_label: str | None = None  # its `model` label in metrics (adapters: bounded)
    stream: bool | None = None
    usage: TokenUsage | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    error: tuple[int, str | None] | None = None  # (status, code) raised by the generation
    closed_early: bool = False  # the consumer closed the generation before its end
    interrupted: bool = False  # a CancelledError went through the generation
    cancelled: bool = False  # the handler was cancelled (client gone)
    media_kind: str | None = None  # its media parts' kind, MIXED_MEDIA for several; None: none
    media_check_s: float | None = None  # decoding its data: URLs + checking its media
    media_fetch_s: float = 0.0  # fetching its remote media (0: none)
    model_sent_at: float | None = None  # time.monotonic() when its generation went to Triton
    model_timings: dict[str, float] | None = None  # the stages the model measured, if asked

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started


RECORD_KEY = web.RequestKey("record", RequestRecord)


# ---- the middleware body ---------------------------------------------------------------


async def observe_request(request: web.Request, handler: Any) -> web.StreamResponse:
    """Runs `handler`, then counts and logs the request; `REQUEST_ID_KEY` must be set."""
    metrics = request.app[METRICS_KEY]
    route = route_of(request)
    record = request[RECORD_KEY] = RequestRecord(
        request_id=request[REQUEST_ID_KEY],
        method=request.method,
        path=request.path[:_MAX_LOGGED_PATH],
        route=route.label if route is not None else UNMATCHED_ROUTE,
        started=time.monotonic(),
    )
    tracked = route is None or route.in_flight_gauge
    if tracked:
        metrics.in_flight.inc()
    status = 500
    code: str | None = None
    with request_span(request, route) as span:
        try:
            response = await handler(request)
            status = response.status
            if status >= 400:
                code = request[ERROR_KEY].code if ERROR_KEY in request else envelope_code(response)
            return response
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        except web.HTTPException as exc:  # non-errors (redirects) that error_middleware re-raises
            status = exc.status
            raise
        finally:
            if tracked:
                metrics.in_flight.dec()
            end_request_span(span, record.request_id, finish(record, metrics, status, code))


def envelope_code(response: web.StreamResponse) -> str | None:
    """`error.code` of an OpenAI error envelope response; None for any other body."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or len(body) > _MAX_ENVELOPE_BYTES:
        return None
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def finish(record: RequestRecord, metrics: ProxyMetrics, status: int, code: str | None) -> int:
    """Counts the request in the metrics and logs its line; the status it was counted with."""
    duration = time.monotonic() - record.started
    cancelled = record.cancelled or (record.closed_early and record.error is None and status < 400)
    cause: str | None = None
    if cancelled:
        status = CLIENT_CLOSED
        cause = CLIENT_DISCONNECTED
        metrics.disconnects.labels(record.route).inc()
    elif status >= 400:
        cause = error_cause(status, code)
    elif record.error is not None:  # an error event in a stream that had started as 200
        status_raised, code = record.error
        cause = error_cause(status_raised, code)
    elif record.interrupted:
        # Cancelled without the handler being cancelled: a timeout (asyncio.timeout) cut the
        # generation, and its error went out as a stream event.
        cause = "timeout"
    if cause is not None and not cancelled:
        metrics.rejections.labels(cause).inc()
    method = record.method if record.method in METHODS else "other"
    metrics.requests.labels(record.route, method, str(status)).inc()
    metrics.duration.labels(record.route).observe(duration)
    if record.media_kind is not None and record.media_check_s is not None:
        metrics.media_check.labels(record.media_kind).observe(record.media_check_s)
        if record.media_kind == IMAGE.name:
            metrics.image_decode.observe(record.media_check_s)
    for stage, seconds in (stage_timings(record) or {}).items():
        metrics.stages.labels(stage).observe(seconds)
    usage = record.usage
    label = record.model_label or record.model
    if usage is not None and label is not None:
        metrics.prompt_tokens.labels(label).inc(usage.prompt_tokens)
        metrics.completion_tokens.labels(label).inc(usage.completion_tokens)
        metrics.image_tokens.labels(label).inc(usage.image_tokens or 0)
    log_request(record, status, duration, cause, code)
    return status


# ---- the log line ----------------------------------------------------------------------


def log_request(
    record: RequestRecord, status: int, duration_s: float, cause: str | None, code: str | None
) -> None:
    usage = record.usage
    ttft = record.ttft_s
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "route": record.route,
        "status": status,
        "model": record.model,
        "stream": record.stream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "image_tokens": usage.image_tokens if usage else None,
        "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
        "duration_ms": round(duration_s * 1000, 1),
    }
    if cause is not None:
        fields["cause"] = cause
        fields["code"] = code
    access_log.info(RequestLine(fields), extra={"fields": fields})


class RequestLine:
    """The text form of a request's log line, rendered only if a text formatter asks:
    `request <id> <METHOD> <path> -> <status> key=value ...` (`-`: not known)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        head = f"request {f['request_id']} {f['method']} {f['path']} -> {f['status']}"
        rest = " ".join(
            f"{name}={_text(value)}"
            for name, value in f.items()
            if name not in ("request_id", "method", "path", "status")
        )
        return f"{head} {rest}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- hooks in the request path ---------------------------------------------------------


async def observe_generation(
    request: web.Request,
    chunks: AsyncGenerator[GenerationChunk, None],
    *,
    model: str,
    stream: bool,
    usage: TokenUsage,
    label: str | None = None,
) -> AsyncGenerator[GenerationChunk, None]:
    """`chunks`, timed: TTFT and inter-chunk gaps (streams only: a non-streamed completion
    arrives as one chunk), how it ended. Closing this closes `chunks`. `label`: the `model`
    label of its metrics when not `model` itself (a LoRA adapter's bounded label)."""
    record = request[RECORD_KEY]
    metrics = request.app[METRICS_KEY]
    record.model, record.stream, record.usage = model, stream, usage
    record.model_label = label = label or model
    metrics.generations.labels(label).inc()
    inter_token = metrics.inter_token.labels(label)  # looked up once, observed per chunk
    if record.model_sent_at is None:  # the stream starts with the first iteration
        record.model_sent_at = time.monotonic()
    span = start_child("stream", attributes={"gen_ai.request.model": model, "stream": stream})
    failure: BaseException | None = None
    try:
        async for chunk in chunks:
            if chunk.timings is not None:
                record.model_timings = chunk.timings
            if stream and chunk.text:
                now = time.monotonic()
                if record.last_token_at is None:
                    record.first_token_at = now
                    metrics.ttft.labels(label).observe(now - record.started)
                else:
                    inter_token.observe(now - record.last_token_at)
                record.last_token_at = now
            yield chunk
    except APIError as exc:
        record.error = (exc.status, exc.code)
        failure = exc
        raise
    except GeneratorExit:  # the stream's writer gave up: the client is gone
        record.closed_early = True
        raise
    except asyncio.CancelledError:  # the handler's cancellation, or a timeout's
        record.interrupted = True
        raise
    except Exception as exc:
        record.error = (INTERNAL_ERROR.status, INTERNAL_ERROR.code)
        failure = exc
        raise
    finally:
        await chunks.aclose()
        _end_stream_span(span, record, failure)


def _end_stream_span(span: Any, record: RequestRecord, failure: BaseException | None) -> None:
    if span is None:
        return
    usage = record.usage
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    if record.first_token_at is not None:
        span.set_attribute("ttft_ms", round(1000 * (record.first_token_at - record.started), 3))
    end_child(span, failure)


def stage_timings(record: RequestRecord) -> dict[str, float] | None:
    """The request's stages in seconds (`STAGES` order) when the model measured its own: the
    proxy's media fetch, then the model's, with ttft counted from the request's arrival at the
    proxy (the proxy's time until it sent the request to Triton, plus the model's ttft from its
    arrival there); None when the model sent none."""
    model = record.model_timings
    if model is None:
        return None
    stages = {**model, "media_fetch": record.media_fetch_s}
    if "ttft" in model and record.model_sent_at is not None:
        stages["ttft"] = model["ttft"] + max(0.0, record.model_sent_at - record.started)
    return {stage: stages[stage] for stage in STAGES if stage in stages}


class _TimedFetcher:
    """A `MediaFetcher` that adds up the time its fetches take."""

    def __init__(self, fetcher: MediaFetcher) -> None:
        self._fetcher = fetcher
        self.calls = 0
        self.elapsed = 0.0

    async def fetch_all(self, refs: Sequence[MediaRef]) -> list[bytes]:
        self.calls += 1
        started = time.perf_counter()
        try:
            return await self._fetcher.fetch_all(refs)
        finally:
            self.elapsed += time.perf_counter() - started


async def load_media_timed(
    request: web.Request, refs: Sequence[MediaRef], fetcher: MediaFetcher | None
) -> list[bytes]:
    """`load_media`, counting the parts by kind and source and timing the fetch (observed
    here) and the data: URL decoding (the rest of the time `load_media` takes; observed with
    the checks of `timed_media_check` when the request ends), failures included."""
    metrics = request.app[METRICS_KEY]
    record = request[RECORD_KEY]
    kinds = {ref.kind.name for ref in refs}
    record.media_kind = (kinds.pop() if len(kinds) == 1 else MIXED_MEDIA) if kinds else None
    timed = _TimedFetcher(fetcher) if fetcher is not None else None
    started = time.perf_counter()
    remote = sum(ref.is_remote for ref in refs)
    try:
        with child_span("media.fetch", parts=remote) if remote else contextlib.nullcontext():
            return await load_media(refs, timed)
    finally:
        total = time.perf_counter() - started
        _count_parts(metrics, refs)
        fetch_s = timed.elapsed if timed is not None else 0.0
        record.media_fetch_s += fetch_s
        if timed is not None and timed.calls:
            assert record.media_kind is not None  # a fetch means remote parts
            metrics.media_fetch.labels(record.media_kind).observe(fetch_s)
            if record.media_kind == IMAGE.name:
                metrics.image_fetch.observe(fetch_s)
        if any(not ref.is_remote for ref in refs):
            _add_media_check(record, max(total - fetch_s, 0.0))


def _count_parts(metrics: ProxyMetrics, refs: Sequence[MediaRef]) -> None:
    sources = Counter((ref.kind, "remote" if ref.is_remote else "inline") for ref in refs)
    for (kind, source), count in sources.items():
        metrics.media_parts.labels(kind.name, source).inc(count)
        if kind is IMAGE:
            metrics.images.labels(source).inc(count)


async def timed_media_check(request: web.Request, check: Awaitable[None]) -> None:
    """Awaits `check` (`limits.check_media`), adding its time to the request's media
    decode/validation time."""
    started = time.perf_counter()
    record = request[RECORD_KEY]
    kind = record.media_kind  # None: no media, nothing is decoded
    try:
        with child_span("media.decode", kind=kind) if kind else contextlib.nullcontext():
            await check
    finally:
        _add_media_check(record, time.perf_counter() - started)


def _add_media_check(record: RequestRecord, seconds: float) -> None:
    record.media_check_s = (record.media_check_s or 0.0) + seconds
