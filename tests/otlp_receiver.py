"""An OTLP/HTTP traces receiver for tests: aiohttp on 127.0.0.1, in a thread of its own, taking
what a collector takes on `/v1/traces`: protobuf bodies (tritonserver's exporter) and JSON
ones (the project's, qwen_vl_backend/otlp.py), both decoded with opentelemetry-proto, so a
body a collector would refuse fails here too."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

TRACES_PATH = "/v1/traces"


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` then `receiver.endpoint` (the base URL to configure)
    and `receiver.wait_for(...)`; spans are kept with their resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []  # (service.name, span)
        self.refused: list[str] = []  # why a body could not be decoded
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.endpoint = ""

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post(TRACES_PATH, self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            if request.content_type == "application/json":
                export = json_format.Parse(_ids_as_base64(body), ExportTraceServiceRequest())
            else:
                export = ExportTraceServiceRequest.FromString(body)
        except Exception as exc:  # what a collector would answer 400 to
            with self._changed:
                self.refused.append(repr(exc))
                self._changed.notify_all()
            return web.Response(status=400)
        with self._changed:
            for resource_spans in export.resource_spans:
                service = _service_name(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
            self._changed.notify_all()
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> list[tuple[str, Span]]:
        """The spans of one trace (hex id) received so far, by start time."""
        with self._changed:
            found = [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]
        return sorted(found, key=lambda item: item[1].start_time_unix_nano)

    def wait_for(self, done: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Until `done()` holds (checked as bodies arrive), or `timeout`; its last answer."""
        with self._changed:
            return self._changed.wait_for(lambda: done() or bool(self.refused), timeout)


def _ids_as_base64(body: bytes) -> str:
    """OTLP's JSON writes ids as hex where protobuf's JSON mapping expects base64."""
    import json

    export = json.loads(body)
    for resource_spans in export.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json.dumps(export)


def _service_name(attributes: Any) -> str:
    for attribute in attributes:
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""
