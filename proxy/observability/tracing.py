"""OpenTelemetry spans of the proxy (docs/observability.md "Traces").

A generating route (`Route.traced`, proxy/serving/routes.py) gets a `request` span, a child of
the caller's W3C `traceparent` (and `tracestate`) when it sent one; inside it `admission`,
`media.fetch`, `media.decode`, `stream` and the Triton call (`triton.infer`), whose context
goes to Triton as the `traceparent` request parameter (the model's spans hang under it) and as
gRPC metadata (Triton's own spans, when its OpenTelemetry tracing is on).

Off (no `--trace-otlp-endpoint`) there is no tracer: the request middleware checks one app key
and nothing else runs. On, a span is made only under a recording request span, so unsampled
requests, and work outside a request (Batch API lines), cost a context lookup.

Child spans find the tracer in the OpenTelemetry context the request span made current (the
request's task and the tasks it starts), so the transport needs no aiohttp request to trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..serving.routes import Route

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = otel_context.create_key("qwen_vl_proxy_tracer")
INSTRUMENTATION = "qwen_vl_proxy"
REQUEST_ID = "qwen_vl.request_id"  # the request id attribute, the model's spans have it too


@dataclass(frozen=True)
class TraceSettings:
    """Each field is the flag `--trace-<field>` (proxy/config.py)."""

    otlp_endpoint: str = ""  # "": tracing off
    sample_ratio: float = 1.0
    service_name: str = "qwen-vl-proxy"


class Tracing:
    """The proxy's tracer (None: tracing off) and the provider to flush at shutdown."""

    def __init__(self, tracer: Tracer | None = None, provider: Any = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @classmethod
    def from_settings(cls, settings: TraceSettings) -> Tracing:
        if not settings.otlp_endpoint:
            return cls()
        from .otlp import tracer_provider  # the SDK is imported only when tracing is on

        provider = tracer_provider(
            settings.otlp_endpoint, settings.service_name, settings.sample_ratio
        )
        return cls(provider.get_tracer(INSTRUMENTATION), provider)

    def shutdown(self) -> None:
        """Exports what is left and stops the exporter."""
        if self._provider is not None:
            self._provider.shutdown()


TRACING_KEY = web.AppKey("tracing", Tracing)


@contextlib.contextmanager
def request_span(request: web.Request, route: Route | None) -> Iterator[trace.Span | None]:
    """The request's span, current while inside, when tracing is on and `route` is traced;
    the caller's `traceparent`/`tracestate` headers are its parent."""
    tracing = request.app.get(TRACING_KEY)
    if tracing is None or tracing.tracer is None or route is None or not route.traced:
        yield None
        return
    parent = otel_context.set_value(_TRACER, tracing.tracer, _PROPAGATOR.extract(request.headers))
    span = tracing.tracer.start_span(
        f"{route.method} {route.label}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route.label},
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    finally:
        otel_context.detach(token)
        span.end()


def end_request_span(span: trace.Span | None, request_id: str, status: int) -> None:
    """The request's outcome on its span: a 5xx is an error (OpenTelemetry's HTTP server
    rule: a 4xx is the client's)."""
    if span is None:
        return
    span.set_attribute(REQUEST_ID, request_id)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def start_child(
    name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None
) -> trace.Span | None:
    """A span under the current one, when that is a recording request's; None otherwise.
    The caller ends it (`end_child`); it is not made current, so it may live across the
    yields of an async generator."""
    parent = trace.get_current_span()
    if not parent.is_recording():
        return None
    tracer = otel_context.get_value(_TRACER)
    if tracer is None:
        return None
    return tracer.start_span(name, kind=kind, attributes=attributes)  # type: ignore[attr-defined]


def end_child(span: trace.Span | None, error: BaseException | None = None) -> None:
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


@contextlib.contextmanager
def child_span(name: str, **attributes: Any) -> Iterator[trace.Span | None]:
    """`start_child` .. `end_child` around a block (an error in it marks the span)."""
    span = start_child(name, attributes=attributes)
    if span is None:
        yield None
        return
    try:
        yield span
    except BaseException as exc:
        end_child(span, exc)
        raise
    span.end()


def trace_headers(span: trace.Span | None) -> dict[str, str]:
    """`traceparent` (and `tracestate`) naming `span` as the parent; without one, the current
    context's when it is a request's that was not sampled (flag 00: Triton and the model then
    do not sample it either); {} outside a request or with tracing off."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    return carrier
