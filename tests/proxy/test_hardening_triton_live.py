"""A Python-backend model that raises, in a real tritonserver (the echo model of
tests/proxy/triton_models): Triton's error text (exception, file paths) stays in the log,
the client gets a generic 500 with its request id, and the next request is served."""

from __future__ import annotations

import dataclasses
import json

from hardening_helpers import CHAT, assert_envelope, assert_no_leak
from proxy_fakes import SERVED_MODEL, TEST_CONFIG, serving

from proxy.config import with_settings
from proxy.transport.backend import TritonBackend


class RaisingOnRequest:
    """TritonBackend, except that a request mentioning RAISE reaches the echo model with
    unparseable messages, so the model's `execute` raises (json.loads)."""

    def __init__(self, inner: TritonBackend) -> None:
        self._inner = inner

    def generate(self, request, request_id):
        if "RAISE" in request.messages_json:
            request = dataclasses.replace(request, messages_json="{not json")
        return self._inner.generate(request, request_id)

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def test_model_exception_fails_that_request_alone(echo_triton_url, caplog):
    backend = TritonBackend(echo_triton_url)
    config = with_settings(TEST_CONFIG, triton_model="echo")
    try:
        async with serving(config, RaisingOnRequest(backend)) as client:
            for stream in (False, True):
                body = {
                    "model": SERVED_MODEL,
                    "stream": stream,
                    "messages": [{"role": "user", "content": "RAISE"}],
                }
                response = await client.post(CHAT, json=body)
                text = await response.text()
                assert response.status == 500, text
                assert_no_leak(text)
                assert_envelope(json.loads(text), "internal_error")
                assert response.headers["X-Request-Id"] in text
            # The log has what the client did not get.
            assert "JSONDecodeError" in caplog.text or "Expecting" in caplog.text
            body = {"messages": [{"role": "user", "content": "fine now"}]}
            ok = await client.post(CHAT, json=body)
            assert ok.status == 200
            assert (await ok.json())["choices"][0]["message"]["content"].endswith("fine now")
    finally:
        await backend.close()
