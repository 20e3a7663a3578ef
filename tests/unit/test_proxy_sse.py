"""SSE framing of stream chunks, errors and the [DONE] terminator."""

from __future__ import annotations

import json

from proxy.errors import APIError
from proxy.request.sse import DONE_EVENT, sse_error, sse_event


def test_event_is_one_data_line_then_blank_line():
    event = sse_event({"choices": [{"delta": {"content": "line1\nline2\r\n"}}]})
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2  # newlines inside the payload are JSON-escaped
    payload = json.loads(event[len(b"data: ") : -2])
    assert payload["choices"][0]["delta"]["content"] == "line1\nline2\r\n"


def test_event_is_utf8_json():
    event = sse_event({"content": "猫"})
    assert event == 'data: {"content":"猫"}\n\n'.encode()


def test_done_event():
    assert DONE_EVENT == b"data: [DONE]\n\n"


def test_error_is_envelope_event_followed_by_done():
    error = APIError(
        500, "internal server error (request id r1)", type="server_error", code="internal_error"
    )
    raw = sse_error(error)
    first, second, rest = raw.split(b"\n\n")
    assert json.loads(first[len(b"data: ") :]) == {
        "error": {
            "message": "internal server error (request id r1)",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert second + b"\n\n" == DONE_EVENT
    assert rest == b""
