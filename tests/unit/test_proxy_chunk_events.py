"""The spliced SSE chunk events are byte for byte what `sse_event(chunk_body(...))` was."""

import json

import pytest

from proxy.api.chat.render import ChunkEvents, CompletionIdentity, chunk_body
from proxy.request.sse import json_bytes, sse_event

IDENTITY = CompletionIdentity(id="chatcmpl-abc", created=1700000000, model="qwen/猫-\u2028")

TEXTS = [
    "",
    "x",
    "猫 and 🐈",
    'quote " backslash \\ /',
    "ctl \x00\x01\x1f\x7f \b\f\n\r\t",
    "\u2028\u2029",
]
LOGPROBS = [
    None,
    [],
    [{"token": "猫", "logprob": -0.25, "bytes": [231, 140, 171], "top_logprobs": []}],
    [
        {
            "token": "a",
            "logprob": -1e-05,
            "bytes": [97],
            "top_logprobs": [{"token": "b", "logprob": -3.5, "bytes": [98]}],
        }
    ],
    [{"token": "z", "logprob": float("-inf"), "bytes": [122], "top_logprobs": []}],
]


def reference(delta, finish_reason=None, *, include_usage, logprobs=None, index=0) -> bytes:
    body = chunk_body(
        IDENTITY, delta, finish_reason, include_usage=include_usage, logprobs=logprobs, index=index
    )
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_content_events_match_the_reference(include_usage, text):
    events = ChunkEvents(IDENTITY, include_usage)
    for index in (0, 3):
        assert events({"content": text}, index=index) == reference(
            {"content": text}, include_usage=include_usage, index=index
        )


@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_logprob_events_parse_to_the_reference(logprobs):
    events = ChunkEvents(IDENTITY, True)
    ours = events({"content": "a"}, logprobs=logprobs)
    expected = reference({"content": "a"}, include_usage=True, logprobs=logprobs)
    # orjson writes -1e-05 as -0.00001: the same number
    assert json.loads(ours[6:]) == json.loads(expected[6:])
    if logprobs and logprobs[0]["logprob"] == float("-inf"):
        assert ours == expected  # json's -Infinity, as the stream always sent


def test_role_finish_and_tool_call_events_match_the_reference():
    events = ChunkEvents(IDENTITY, False)
    role = {"role": "assistant", "content": ""}
    call = {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"a": "猫"}'},
            }
        ]
    }
    assert events(role) == reference(role, include_usage=False)
    assert events({}, "stop", index=1) == reference({}, "stop", include_usage=False, index=1)
    assert events(call) == reference(call, include_usage=False)


def test_json_bytes_falls_back_to_json_for_what_orjson_refuses():
    assert json_bytes({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert json_bytes({1: "a"}) == b'{"1":"a"}'
    with pytest.raises(UnicodeEncodeError):  # as before: no UTF-8 form
        sse_event({"content": "\ud800"})
