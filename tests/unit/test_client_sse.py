"""client/sse.py: the stream reader client/chat.py and bench/chat_bench.py share."""

import io

import pytest

from client.chat import stream_answer
from client.sse import DONE, stream_event, stream_events


@pytest.mark.parametrize(
    "line, event",
    [
        (b'data: {"a": 1}', {"a": 1}),
        (b'data:{"a": 1}\r\n', {"a": 1}),  # no space, a line ending left on (aiohttp's lines)
        ('data: {"text": "猫"}', {"text": "猫"}),
        (b"data: [DONE]", DONE),
        (b"", None),
        (b": a comment", None),
        (b"event: message", None),
    ],
)
def test_a_line_is_an_event_the_terminator_or_nothing(line, event):
    assert stream_event(line) == event


class FakeResponse:
    def __init__(self, *lines: bytes) -> None:
        self.lines = lines

    def iter_lines(self, decode_unicode=False):
        return iter(self.lines)


def chunk(content: str) -> bytes:
    return b'data: {"choices": [{"delta": {"content": "%s"}}]}' % content.encode()


def test_the_client_prints_the_deltas_up_to_done():
    out = io.StringIO()
    response = FakeResponse(chunk("Hel"), b"", chunk("lo"), b"", b"data: [DONE]", chunk("never"))
    assert stream_answer(response, out) == 0
    assert out.getvalue() == "Hello\n"


def test_the_client_stops_at_an_error_event(capsys):
    error = b'data: {"error": {"type": "server_error", "message": "boom"}}'
    assert stream_answer(FakeResponse(chunk("a"), error), io.StringIO()) == 1
    assert "server_error: boom" in capsys.readouterr().err


def test_stream_events_end_at_the_terminator():
    lines = [chunk("a"), b"", b": keep-alive", chunk("b"), b"data: [DONE]", chunk("after")]
    assert [e["choices"][0]["delta"]["content"] for e in stream_events(lines)] == ["a", "b"]
