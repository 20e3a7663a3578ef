"""OpenTelemetry spans exported over OTLP/HTTP, as JSON, to a collector; the tracer provider
the proxy and the model both build (docs/observability.md "Traces").

Why JSON bodies: OTLP/HTTP takes protobuf or JSON on the same `/v1/traces` path, and every
OTLP receiver (the OpenTelemetry Collector, Jaeger, Tempo) accepts both. The project's
Python OTLP exporters (`opentelemetry-exporter-otlp-proto-*`) need protobuf >= 5 from 1.27 on,
while tritonclient 2.51 pins protobuf < 5, and the last line that accepts protobuf 4 (1.26)
needs an opentelemetry-api older than the one the environment already has. JSON needs only the
standard library, so the model image gets no protobuf either.

The sampler is parent-based: a request whose `traceparent` says sampled is traced, one that
says not sampled is not, and a request without one is traced with probability `sample_ratio`.

This file is copied byte for byte as proxy/observability/otlp.py (a test checks): the model
folder deploys on its own.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
_EXPORT_TIMEOUT_S = 10.0


def traces_url(endpoint: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT's rule: a base URL gets `/v1/traces`; a URL that already
    ends in it (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT's form) is taken as it is."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def tracer_provider(endpoint: str, service_name: str, sample_ratio: float) -> TracerProvider:
    """A provider that samples parent-based with `sample_ratio` for roots and exports in
    batches, from a thread of its own, to the collector at `endpoint`."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OtlpJsonExporter(traces_url(endpoint))))
    return provider


class OtlpJsonExporter(SpanExporter):
    """POSTs finished spans to an OTLP/HTTP traces URL as JSON; a batch the collector refuses
    or cannot take is dropped with a warning (tracing never holds up serving)."""

    def __init__(self, url: str, timeout_s: float = _EXPORT_TIMEOUT_S) -> None:
        self.url = url
        self._timeout_s = timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = json.dumps(encode_spans(spans)).encode("utf-8")
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("%d spans not exported to %s: %s", len(spans), self.url, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def encode_spans(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """An OTLP `ExportTraceServiceRequest` in OTLP's JSON encoding (ids as hex, 64-bit
    integers as strings, enums as numbers), spans grouped by resource and scope."""
    grouped: dict[Any, dict[Any, list[ReadableSpan]]] = {}
    for span in spans:
        scope = span.instrumentation_scope
        grouped.setdefault(span.resource, {}).setdefault(scope, []).append(span)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(resource.attributes)},
                "scopeSpans": [
                    {
                        "scope": {"name": scope.name, "version": scope.version or ""}
                        if scope is not None
                        else {},
                        "spans": [_span(span) for span in scoped],
                    }
                    for scope, scoped in scopes.items()
                ],
            }
            for resource, scopes in grouped.items()
        ]
    }


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    encoded: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": span.kind.value + 1,  # OTLP's enum starts with SPAN_KIND_UNSPECIFIED
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes or {}),
        "status": {"code": span.status.status_code.value},
    }
    if span.parent is not None:
        encoded["parentSpanId"] = f"{span.parent.span_id:016x}"
    if context.trace_state:
        encoded["traceState"] = context.trace_state.to_header()
    if span.status.description:
        encoded["status"]["message"] = span.status.description
    if span.events:
        encoded["events"] = [
            {
                "timeUnixNano": str(event.timestamp),
                "name": event.name,
                "attributes": _attributes(event.attributes or {}),
            }
            for event in span.events
        ]
    return encoded


def _attributes(attributes: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _value(value)} for key, value in attributes.items()]


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    return {"arrayValue": {"values": [_value(item) for item in value]}}
