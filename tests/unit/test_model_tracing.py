"""The model's spans (qwen_vl_backend/engine/tracing.py), built from the engine's own timings of
a real request on the tiny checkpoint, caught by the SDK's in-memory exporter."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sample_images import encoded_image
from test_engine import RecordingSink

from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.engine.tracing import REQUEST_ID, RequestTracer, request_tracer
from qwen_vl_backend.request.prepare import RawRequest
from qwen_vl_backend.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PROXY_SPAN = "b7ad6b7169203331"
# Small steps: the image prompt's prefill takes several chunks.
SETTINGS = dataclasses.replace(ModelSettings(), max_step_tokens=16)


@pytest.fixture(scope="module")
def exporter():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def engine(checkpoint, exporter):
    provider = TracerProvider()  # parent-based, always on for roots: the SDK's default
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = BatchingEngine(checkpoint, SETTINGS, tracer=RequestTracer(provider.get_tracer("t")))
    yield engine
    assert engine.shutdown(30)


def request(trace_context, request_id="traced-1"):
    content = [{"type": "image"}, {"type": "text", "text": "What is in this picture, briefly?"}]
    return RawRequest(
        request_id=request_id,
        messages=json.dumps([{"role": "user", "content": content}]),
        images=[encoded_image(size=(56, 56), color=(31, 77, 5))],
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"max_tokens": 6, "temperature": 0}),
        trace_context=trace_context,
    )


def run(engine, raw):
    sink = RecordingSink()
    engine.submit(raw, sink)
    return sink.wait().final


def test_a_request_s_spans_follow_its_stages_under_the_proxy_s_span(engine, exporter):
    exporter.clear()
    final = run(engine, request({"traceparent": f"00-{TRACE_ID}-{PROXY_SPAN}-01"}))

    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "qwen_vl.request"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PROXY_SPAN and root.kind is SpanKind.SERVER
    assert root.attributes[REQUEST_ID] == "traced-1"
    assert root.attributes["gen_ai.usage.output_tokens"] == final.num_tokens == 6
    assert root.attributes["gen_ai.usage.input_tokens"] == final.prompt_tokens
    children = sorted((s for s in spans if s is not root), key=lambda s: s.start_time)
    assert all(s.parent.span_id == root.context.span_id for s in children)
    names = [s.name for s in children]
    # queue, preparation, the wait for a slot, the tower, the prompt in chunks, then decode
    assert names[:3] == ["queue", "preprocess", "kv_slot_wait"]
    assert names[-1] == "decode" and "vision" in names
    prefill = [s for s in children if s.name == "prefill"]
    assert len(prefill) > 1
    assert sum(s.attributes["prompt_tokens"] for s in prefill) == final.prompt_tokens
    assert children[-1].attributes["output_tokens"] == 6
    for span in spans:
        assert span.start_time <= span.end_time
    assert all(root.start_time <= s.start_time and s.end_time <= root.end_time for s in children)


def test_a_request_the_proxy_did_not_sample_makes_no_span(engine, exporter):
    exporter.clear()
    run(engine, request({"traceparent": f"00-{TRACE_ID}-{PROXY_SPAN}-00"}, "unsampled"))
    assert exporter.get_finished_spans() == ()


def test_without_an_endpoint_or_the_sdk_there_is_no_tracer(monkeypatch):
    assert request_tracer("", 1.0, "model") is None
    monkeypatch.setitem(sys.modules, "qwen_vl_backend.otlp", None)  # the SDK is not installed
    assert request_tracer("http://collector:4318", 1.0, "model") is None


def test_the_otlp_exporter_is_one_file_in_model_and_proxy():
    model_copy = ROOT / "model_repository/qwen2_5_vl/1/qwen_vl_backend/otlp.py"
    assert (ROOT / "proxy/observability/otlp.py").read_bytes() == model_copy.read_bytes()


def test_the_sample_ratio_is_a_share():
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        ModelSettings(trace_sample_ratio=1.5)
