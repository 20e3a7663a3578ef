"""The proxy's OpenTelemetry spans (proxy/observability/tracing.py), with the SDK's in-memory
exporter, over its real gRPC client and the fake Triton (which records the request's
parameters and gRPC metadata); and the OTLP/JSON export, decoded as a collector would."""

from __future__ import annotations

import base64

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from otlp_receiver import OtlpReceiver
from proxy_fakes import PNG_BYTES, SERVED_MODEL, TEST_CONFIG, serving

from proxy.config import parse_config, with_settings
from proxy.observability.otlp import OtlpJsonExporter, traces_url
from proxy.observability.tracing import REQUEST_ID, TRACING_KEY, Tracing

CHAT = "/v1/chat/completions"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACESTATE = "vendor=opaque"


def traceparent(sampled: bool = True) -> str:
    return f"00-{TRACE_ID}-{CALLER_SPAN}-{'01' if sampled else '00'}"


def chat_body(text: str = "tokens=3", image: bool = False, remote: bool = False) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image:
        url = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    if remote:
        content.append({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
    return {
        "model": SERVED_MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


class PngFetcher:
    """A MediaFetcher that answers every URL with a PNG at once."""

    async def fetch_all(self, refs):
        return [PNG_BYTES for _ in refs]


@pytest.fixture
async def traced_client(fake_triton, exporter):
    """The app over its real TritonBackend (to the fake Triton), tracing into `exporter`;
    roots sampled never, so only a caller's sampled traceparent makes a trace."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), provider)
    config = with_settings(TEST_CONFIG, triton_url=fake_triton.url)
    async with serving(config, fetcher=PngFetcher(), tracing=tracing) as client:
        yield client


async def _chat(client, headers: dict[str, str], **body: object) -> str:
    response = await client.post(CHAT, json=chat_body(**body), headers=headers)
    text = await response.text()
    assert response.status == 200, text
    return response.headers["X-Request-Id"]


async def test_one_request_is_one_trace_under_the_callers_traceparent(
    traced_client, exporter, fake_triton
):
    headers = {"traceparent": traceparent(), "tracestate": TRACESTATE}
    request_id = await _chat(traced_client, headers, image=True)

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {
        f"POST {CHAT}",
        "admission",
        "media.decode",
        "stream",
        "triton.infer",
    }
    root = spans[f"POST {CHAT}"]
    assert {f"{span.context.trace_id:032x}" for span in spans.values()} == {TRACE_ID}
    assert f"{root.parent.span_id:016x}" == CALLER_SPAN and root.parent.is_remote
    assert root.kind is SpanKind.SERVER
    assert root.attributes[REQUEST_ID] == request_id
    assert root.attributes["http.response.status_code"] == 200
    for name in ("admission", "media.decode", "stream", "triton.infer"):
        assert spans[name].parent.span_id == root.context.span_id, name
    # in the order the request went through them, each within the request
    order = [spans[name] for name in ("admission", "media.decode", "stream", "triton.infer")]
    assert [s.start_time for s in order] == sorted(s.start_time for s in order)
    assert all(root.start_time <= s.start_time <= s.end_time <= root.end_time for s in order)
    assert spans["stream"].attributes["gen_ai.usage.output_tokens"] == 3

    # Triton got the Triton call's context: as the request parameter the model reads, and as
    # the gRPC metadata Triton's own tracing reads; the caller's tracestate goes along
    infer = spans["triton.infer"]
    sent = f"00-{TRACE_ID}-{infer.context.span_id:016x}-01"
    assert fake_triton.state.parameters[-1]["traceparent"] == sent
    assert fake_triton.state.parameters[-1]["tracestate"] == TRACESTATE
    assert fake_triton.state.metadata[-1]["traceparent"] == sent
    assert infer.attributes[REQUEST_ID] == request_id


async def test_remote_media_get_a_fetch_span_before_decoding(traced_client, exporter):
    await _chat(traced_client, {"traceparent": traceparent()}, remote=True)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    fetch, decode = spans["media.fetch"], spans["media.decode"]
    assert fetch.attributes["parts"] == 1 and fetch.end_time <= decode.start_time
    assert fetch.parent.span_id == spans[f"POST {CHAT}"].context.span_id


async def test_an_unsampled_request_makes_no_spans_and_tells_triton_so(
    traced_client, exporter, fake_triton
):
    await _chat(traced_client, {"traceparent": traceparent(sampled=False)})
    await _chat(traced_client, {})  # no traceparent: a root, sampled at ratio 0 here
    assert exporter.get_finished_spans() == ()
    # the decision goes on (flag 00), so the model does not sample these at its own ratio
    caller, root = fake_triton.state.parameters
    assert caller["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert not any(int(sent["traceparent"][-2:], 16) & 1 for sent in (caller, root))
    assert fake_triton.state.metadata[0]["traceparent"] == caller["traceparent"]


async def test_only_generating_routes_are_traced(traced_client, exporter):
    response = await traced_client.get("/v1/models", headers={"traceparent": traceparent()})
    assert response.status == 200
    assert exporter.get_finished_spans() == ()


async def test_a_model_error_marks_the_triton_call_and_stream(traced_client, exporter):
    response = await traced_client.post(
        CHAT, json=chat_body("model_error=internal"), headers={"traceparent": traceparent()}
    )
    await response.read()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert not spans["triton.infer"].status.is_ok
    assert not spans["stream"].status.is_ok
    root = spans[f"POST {CHAT}"]  # the error came before the first chunk: a 500 response
    assert root.attributes["http.response.status_code"] == 500 and not root.status.is_ok


async def test_without_an_endpoint_nothing_is_traced_or_sent(fake_triton):
    config = with_settings(TEST_CONFIG, triton_url=fake_triton.url)
    assert config.tracing.otlp_endpoint == ""
    async with serving(config) as client:
        await _chat(client, {"traceparent": traceparent()})
        assert client.app[TRACING_KEY].tracer is None
    assert "traceparent" not in fake_triton.state.parameters[-1]
    assert "traceparent" not in fake_triton.state.metadata[-1]


def test_tracing_settings_take_opentelemetrys_environment(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    tracing = parse_config([]).tracing
    assert (tracing.otlp_endpoint, tracing.sample_ratio) == ("http://collector:4318", 0.25)
    with pytest.raises(SystemExit):
        parse_config(["--trace-sample-ratio", "1.5"])
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_spans_go_out_as_otlp_json_a_collector_decodes(exporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent", attributes={"n": 3, "f": 0.5, "ok": True}):
        with tracer.start_as_current_span("child", attributes={"names": ["a", "b"]}) as child:
            child.add_event("first token", {"tokens": 1})
    with OtlpReceiver() as receiver:
        sent = OtlpJsonExporter(traces_url(receiver.endpoint)).export(exporter.get_finished_spans())
        assert sent.name == "SUCCESS"
        assert receiver.refused == []
        received = {span.name: span for _, span in receiver.spans}
    parent, child = received["parent"], received["child"]
    assert child.parent_span_id == parent.span_id and child.trace_id == parent.trace_id
    assert len(parent.trace_id) == 16 and len(parent.span_id) == 8
    values = {a.key: a.value for a in parent.attributes}
    assert (values["n"].int_value, values["f"].double_value, values["ok"].bool_value) == (
        3,
        0.5,
        True,
    )
    assert [v.string_value for v in child.attributes[0].value.array_value.values] == ["a", "b"]
    assert child.events[0].name == "first token"
    assert child.end_time_unix_nano >= child.start_time_unix_nano > 0
