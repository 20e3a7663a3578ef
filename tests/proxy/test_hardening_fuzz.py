"""Property-based fuzzing of the chat endpoint with hypothesis: whatever JSON arrives, the
answer is never a 5xx and never carries internal text; a 200 is a well-formed completion.

The app (fake backend) runs on its own event loop in a thread, so hypothesis drives plain
synchronous requests; examples are bounded and derandomized, so CI runs the same ones.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import requests
from hardening_helpers import CHAT, assert_envelope, assert_no_leak
from helpers import data_url, sse_payloads
from hostile_samples import BOMB_PNG, GOOD_JPEG, GOOD_PNG, ONE_BY_10000, TRUNCATED_JPEG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy_fakes import SERVED_MODEL, TEST_CONFIG, FakeBackend, serving

from proxy.transport.backend import build_inputs

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class TensorBuildingBackend(FakeBackend):
    """Builds the real Triton input tensors first, as TritonBackend does, so what the fake
    accepts is also what the real client can encode (UTF-8, sizes, types)."""

    async def generate(self, request, request_id):
        build_inputs(request)
        async for chunk in super().generate(request, request_id):
            yield chunk


@pytest.fixture(scope="module")
def server_url():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    served = serving(TEST_CONFIG, TensorBuildingBackend())  # entered and left on that loop
    client = asyncio.run_coroutine_threadsafe(served.__aenter__(), loop).result(10)
    yield f"http://127.0.0.1:{client.server.port}"
    asyncio.run_coroutine_threadsafe(served.__aexit__(None, None, None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def session():
    with requests.Session() as session:
        yield session


# ---- strategies ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly well-formed, sometimes hostile, so examples also get past validation."""
    return st.integers(0, 7).flatmap(lambda roll: bad if roll == 7 else good)


surrogates = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
)
texts = mostly(st.text(st.characters(exclude_categories=["Cs"]), max_size=40), surrogates)


image_urls = mostly(
    st.sampled_from([data_url(GOOD_PNG), data_url(GOOD_JPEG, "image/jpeg")]),
    st.sampled_from(
        [
            data_url(BOMB_PNG),
            data_url(ONE_BY_10000),
            data_url(TRUNCATED_JPEG, "image/jpeg"),
            "data:image/png;base64,!!!!",
            "data:image/png;base64,",
            "file:///etc/passwd",
            "ftp://example.com/a.png",
            "",
        ]
    )
    | st.binary(max_size=64).map(data_url),
)
image_url_objects = st.fixed_dictionaries(
    {"url": image_urls},
    optional={
        "detail": mostly(st.sampled_from(["auto", "low", "high"]), json_values),
        "min_pixels": mostly(st.integers(3136, 200_000), st.integers(-5, 2**40) | json_values),
        "max_pixels": mostly(st.integers(200_000, 1_003_520), st.integers(-5, 2**40)),
    },
)
parts = mostly(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts})
    | st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": mostly(image_url_objects, image_urls)}
    ),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), json_values, max_size=3)
    | json_values,
)
messages = mostly(
    st.fixed_dictionaries(
        {
            "role": mostly(
                st.sampled_from(["system", "developer", "user", "assistant", "tool"]), json_values
            ),
            "content": mostly(texts | st.lists(parts, min_size=1, max_size=4), json_values),
        }
    ),
    json_values,
)


def number(low: float, high: float, integer: bool = True) -> st.SearchStrategy:
    good = st.integers(int(low), int(high)) if integer else st.floats(low, high)
    bad = st.integers(-(2**70), 2**70) | st.floats() | json_values
    return mostly(good, bad)


valid_fields = {
    "model": st.just(SERVED_MODEL),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.just(1),
    "stop": texts | st.lists(texts, max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.just({"type": "text"}),
    "min_pixels": st.integers(3136, 100_000),
    "max_pixels": st.integers(100_000, 1_003_520),
    "user": texts,
}
hostile_values = (
    json_values
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(["", "gpt-4", 2**64, -1, 0, 1e308])
    | st.lists(texts, min_size=17, max_size=20)
)
valid_requests = st.fixed_dictionaries(
    {"messages": st.lists(messages, min_size=1, max_size=4), "stream": st.booleans()},
    optional={k: v for k, v in valid_fields.items() if k != "stream"},
)


def _with(body: dict, key: str, value: object) -> dict:
    return {**body, key: value}


# A well-formed request, or one with a single top-level field replaced by a hostile value
# (known fields, unknown ones such as `tools`, and `messages` itself).
requests_json = mostly(
    valid_requests,
    st.builds(
        _with,
        valid_requests,
        st.sampled_from([*valid_fields, "messages", "logprobs", "top_logprobs", "tools"]),
        hostile_values,
    ),
) | st.builds(_with, valid_requests, st.just("logprobs"), st.just(True)).flatmap(
    lambda body: st.builds(_with, st.just(body), st.just("top_logprobs"), number(0, 20))
)


def encode(body: object) -> bytes:
    # allow_nan: NaN and Infinity are what Python's json (and so the proxy) accepts too.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def check_answer(response: requests.Response) -> None:
    text = response.content.decode("utf-8")  # always valid UTF-8
    assert response.status_code < 500, text
    assert_no_leak(text)
    if response.status_code >= 400:
        assert_envelope(response.json())
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        assert sse_payloads(text, strict=False)[-1] == "[DONE]"
    else:
        assert response.json()["object"] == "chat.completion"


@FUZZ
@given(body=requests_json)
def test_fuzzed_requests_never_5xx_or_leak(server_url, session, body):
    check_answer(session.post(server_url + CHAT, data=encode(body), timeout=30))


@FUZZ
@given(body=json_values | st.binary(max_size=200))
def test_fuzzed_bodies_never_5xx_or_leak(server_url, session, body):
    data = body if isinstance(body, bytes) else encode(body)
    check_answer(session.post(server_url + CHAT, data=data, timeout=30))
