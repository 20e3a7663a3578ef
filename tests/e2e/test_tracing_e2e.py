"""One traced request through the whole stack: the proxy's spans, Triton's own and the model's
(exported from Triton's Python-backend stub, another process) reach the session's OTLP receiver
as one trace, under the client's traceparent, in the order the request went."""

import secrets

import pytest
import requests
from helpers import data_url
from sample_images import encoded_image

CHAT_ROUTE = "POST /v1/chat/completions"
PROXY = ("admission", "media.decode", "stream", "triton.infer")
MODEL = ("queue", "preprocess", "kv_slot_wait", "prefill", "decode")


@pytest.fixture
def triton_tracing(stack):
    """Triton's OpenTelemetry tracing (set up OFF in the session stack) on for one test."""
    setting = f"{stack.config.triton_http_url}/v2/trace/setting"
    on = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
    assert requests.post(setting, json=on, timeout=10).status_code == 200
    yield
    assert requests.post(setting, json={"trace_level": ["OFF"]}, timeout=10).status_code == 200


def test_one_request_is_one_trace_across_proxy_triton_and_model(
    base_url, otlp_receiver, triton_tracing
):
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    image = data_url(encoded_image(size=(56, 56), color=(140, 12, 201)), "image/png")
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "Say something."},
                    ],
                }
            ],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
        headers={"traceparent": f"00-{trace_id}-{caller}-01"},
        timeout=60,
    )
    assert response.status_code == 200
    request_id = response.headers["X-Request-Id"]

    def names() -> set[str]:
        return {span.name for _, span in otlp_receiver.trace(trace_id)}

    # spans are exported in batches (every 5 s by default) by both processes
    everyone = {CHAT_ROUTE, "qwen_vl.request", "InferRequest"}
    assert otlp_receiver.wait_for(lambda: everyone <= names(), 60)
    assert otlp_receiver.refused == []
    spans = otlp_receiver.trace(trace_id)
    by_name = {span.name: (service, span) for service, span in spans}
    assert set(PROXY) | set(MODEL) <= names()

    service, root = by_name[CHAT_ROUTE]
    assert service == "qwen-vl-proxy" and root.parent_span_id.hex() == caller
    ids = {span.span_id: span for _, span in spans}
    for name in PROXY:
        assert by_name[name][1].parent_span_id == root.span_id, name
    service, model = by_name["qwen_vl.request"]
    infer = by_name["triton.infer"][1]
    assert service == "qwen-vl-model" and model.parent_span_id == infer.span_id
    for name in MODEL:
        assert ids[by_name[name][1].parent_span_id] is model, name
    # Triton's own spans, from the gRPC metadata: its request span beside the model's
    service, triton = by_name["InferRequest"]
    assert service == "triton-inference-server" and triton.parent_span_id == infer.span_id
    request_ids = {
        attribute.value.string_value
        for _, span in spans
        for attribute in span.attributes
        if attribute.key == "qwen_vl.request_id"
    }
    assert request_ids == {request_id}

    # in order: the model's work inside the Triton call, inside the request
    def start(name: str) -> int:
        return by_name[name][1].start_time_unix_nano

    assert start("admission") <= start("media.decode") <= start("triton.infer")
    assert start("triton.infer") <= model.start_time_unix_nano
    assert start("queue") <= start("preprocess") <= start("kv_slot_wait") <= start("decode")
    assert model.end_time_unix_nano <= root.end_time_unix_nano
