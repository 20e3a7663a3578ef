"""OpenTelemetry spans of the model's requests (docs/observability.md "Traces").

A request that reached the batch gets, when it ends, one `qwen_vl.request` span and under it
`queue` (waiting for a preparation thread), `preprocess` (template, media decode, resize,
processor), `kv_slot_wait` (prepared, waiting for a KV slot), one `vision` span per vision-
tower run that served it, one `prefill` span per prompt chunk, and one `decode` span (first
token to last, with the token counts), all built afterwards from the timestamps the engine
records anyway (engine/timings.py): tracing adds no clock reads and no per-step work.

The parent is the request's `traceparent` (and `tracestate`) parameter: the proxy's Triton call.
The sampler is parent-based (qwen_vl_backend/otlp.py), so a request the proxy did not sample
makes no span; one without a parent (a client calling Triton directly) is sampled at
`trace_sample_ratio`.

The OpenTelemetry SDK is optional in the model image: `request_tracer` returns None without it
(with a warning when an endpoint was set), and None means nothing is traced and the engine
calls nothing for tracing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .batching import EngineObserver
from .responses import RequestStream

log = logging.getLogger(__name__)

REQUEST_ID = "qwen_vl.request_id"  # the proxy's spans name the request so too
TRACE_PARAMETERS = ("traceparent", "tracestate")


def request_tracer(endpoint: str, sample_ratio: float, service_name: str) -> RequestTracer | None:
    """The tracer exporting to `endpoint` (OTLP/HTTP); None when `endpoint` is empty or the
    OpenTelemetry SDK is not installed."""
    if not endpoint:
        return None
    try:
        from ..otlp import tracer_provider
    except ImportError:
        log.warning("otlp_traces_endpoint is set but opentelemetry-sdk is not installed: no traces")
        return None
    provider = tracer_provider(endpoint, service_name, sample_ratio)
    log.info("traces go to %s (root sample ratio %g)", endpoint, sample_ratio)
    return RequestTracer(provider.get_tracer("qwen_vl_backend"), provider)


class RequestTracer(EngineObserver):
    """Builds a finished request's spans (on the sender thread; the batch processor exports
    them from a thread of its own)."""

    def __init__(self, tracer: Any, provider: Any = None) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._provider = provider
        self._propagator = TraceContextTextMapPropagator()
        self._in_span = set_span_in_context
        self._server = SpanKind.SERVER

    def request_ended(self, request: RequestStream, outcome: str) -> None:
        timings = request.timings
        if timings is None:
            return
        # time.monotonic() -> Unix nanoseconds, for this request's stamps
        offset = time.time_ns() - int(time.monotonic() * 1e9)

        def ns(stamp: float) -> int:
            return offset + int(stamp * 1e9)

        raw = request.prepared.raw
        parent = self._propagator.extract(raw.trace_context or {})
        completion = sum(choice.assembler.num_tokens for choice in request.choices)
        root = self._tracer.start_span(
            "qwen_vl.request",
            context=parent,
            kind=self._server,
            start_time=ns(timings.arrived),
            attributes={
                REQUEST_ID: raw.request_id,
                "gen_ai.usage.input_tokens": request.prepared.prompt_tokens,
                "gen_ai.usage.output_tokens": completion,
                "image_tokens": request.prepared.image_tokens,
                "outcome": outcome,
            },
        )
        if not root.is_recording():  # not sampled
            return
        context = self._in_span(root)

        def span(name: str, start: float, end: float, **attributes: Any) -> None:
            child = self._tracer.start_span(
                name, context=context, start_time=ns(start), attributes=attributes
            )
            child.end(end_time=ns(max(start, end)))

        span("queue", timings.arrived, timings.prepare_started)
        span(
            "preprocess",
            timings.prepare_started,
            timings.prepared,
            media_decode_ms=round(timings.media_decode * 1000, 3),
        )
        span("kv_slot_wait", timings.prepared, timings.admitted)
        for started, ended in timings.vision_runs:
            span("vision", started, ended)
        for started, ended, tokens in timings.prefill_chunks:
            span("prefill", started, ended, prompt_tokens=tokens)
        if timings.first_token is not None:
            span(
                "decode",
                timings.first_token,
                timings.last_token or timings.first_token,
                output_tokens=completion,
                most_tokens_per_choice=timings.most_tokens,
            )
        root.end(end_time=time.time_ns())

    def shutdown(self) -> None:
        """Exports what is left."""
        if self._provider is not None:
            self._provider.shutdown()
