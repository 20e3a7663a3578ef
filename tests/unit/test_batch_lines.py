"""A batch's input file line by line (proxy/api/batches/lines.py): lines split across chunks
wherever the chunks end, a line over the limit skipped as it streams, and each line checked
against OpenAI's request-input format."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from proxy.api.batches.lines import BadLine, RequestLine, is_blank, parse_line, split_lines

ENDPOINT = "/v1/chat/completions"


def split(data: bytes, sizes, max_bytes: int = 100) -> list[tuple[int, bytes | None]]:
    async def chunks():
        start = 0
        for size in sizes:
            yield data[start : start + size]
            start += size
        if start < len(data):
            yield data[start:]

    async def collect():
        return [item async for item in split_lines(chunks(), max_bytes)]

    return asyncio.run(collect())


def test_lines_are_the_same_wherever_the_chunks_end():
    data = b'{"a": 1}\n\n{"b": 22}\r\nlast line without newline'
    expected = [(1, b'{"a": 1}'), (2, b""), (3, b'{"b": 22}'), (4, b"last line without newline")]
    rng = random.Random(5)
    for _ in range(50):
        sizes = [rng.randint(1, 7) for _ in range(30)]
        assert split(data, sizes) == expected
    assert split(data, [len(data)]) == expected
    assert split(b"one\n", [4]) == [(1, b"one")]  # no empty line after the last newline
    assert split(b"", [0]) == []


def test_a_line_over_the_limit_is_skipped_as_it_streams_and_the_next_is_read():
    long_line = b"x" * 250
    data = b"short\n" + long_line + b"\n" + b"y" * 10 + b"\n" + long_line
    assert split(data, [3] * 200, max_bytes=100) == [
        (1, b"short"),
        (2, None),
        (3, b"y" * 10),
        (4, None),
    ]
    # At the limit exactly, even with a "\r" before the "\n", is not over it.
    assert split(b"z" * 100 + b"\r\n", [7] * 20, max_bytes=100) == [(1, b"z" * 100)]
    assert split(b"z" * 101 + b"\n", [7] * 20, max_bytes=100) == [(1, None)]


def line(**fields) -> bytes:
    base = {"custom_id": "c1", "method": "POST", "url": ENDPOINT, "body": {"messages": []}}
    return json.dumps({**base, **fields}).encode()


def test_a_good_line_keeps_its_custom_id_and_body():
    parsed = parse_line(3, line(body={"model": "m", "messages": [{"role": "user"}]}), ENDPOINT, 99)
    assert isinstance(parsed, RequestLine) and parsed.custom_id == "c1"
    assert json.loads(parsed.body) == {"model": "m", "messages": [{"role": "user"}]}


@pytest.mark.parametrize(
    "raw, custom_id, code, words",
    [
        (None, None, "batch_line_too_large", "Line 7 is larger than 99 bytes"),
        (b"{oops", None, "invalid_json_line", "Line 7 is not a JSON object: it is not valid"),
        (b"\xff\xfe", None, "invalid_json_line", "not valid JSON"),
        (b'"text"', None, "invalid_json_line", "it is a string"),
        (b"[" * 100_000, None, "invalid_json_line", "nests too deep"),
        (line(custom_id=""), None, "invalid_batch_line", "Line 7 has no custom_id"),
        (line(custom_id=5), None, "invalid_batch_line", "has no custom_id"),
        (line(method="GET"), "c1", "invalid_batch_line", 'method must be POST, not "GET"'),
        (line(url="/v1/responses"), "c1", "invalid_batch_line", "url must be /v1/chat/completions"),
        (line(body=[1]), "c1", "invalid_batch_line", "body must be a JSON object, not list"),
        (line(body={"stream": True}), "c1", "invalid_batch_line", "body.stream is not supported"),
    ],
)
def test_a_bad_line_says_what_is_wrong_with_it(raw, custom_id, code, words):
    parsed = parse_line(7, raw, ENDPOINT, 99)
    assert isinstance(parsed, BadLine)
    assert parsed.custom_id == custom_id and parsed.error.code == code
    assert words in parsed.error.message


def test_responses_lines_may_not_run_in_the_background():
    raw = line(url="/v1/responses", body={"input": "hi", "background": True})
    parsed = parse_line(1, raw, "/v1/responses", 999)
    assert isinstance(parsed, BadLine) and parsed.error.param == "body.background"


def test_blank_lines_are_not_requests():
    assert is_blank(b"  \t ") and is_blank(b"")
    assert not is_blank(None) and not is_blank(b"{}")
