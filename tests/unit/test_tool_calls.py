"""Qwen `<tool_call>` blocks → OpenAI tool calls, whole and streamed piece by piece."""

import json

import pytest

from proxy.request.tool_calls import ToolCallStream, parse_call, split_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SECOND = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'


def streamed(text: str, size: int) -> list[tuple[str, object]]:
    """The events of `text` fed `size` characters at a time, content pieces joined."""
    stream = ToolCallStream()
    events = []
    for start in range(0, len(text), size):
        events += stream.feed(text[start : start + size])
    events += stream.finish()
    joined: list[tuple[str, object]] = []
    for kind, value in events:
        if kind == "content" and joined and joined[-1][0] == "content":
            joined[-1] = ("content", joined[-1][1] + value)
        else:
            joined.append((kind, value))
    return [(k, (v.name, v.arguments) if k == "call" else v) for k, v in joined]


def test_content_then_calls():
    content, calls = split_tool_calls("Let me look.\n" + CALL + "\n" + SECOND)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize(
    "text",
    [
        "plain answer, no calls",
        "a <tool_call>{not json}</tool_call> b",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        'unfinished <tool_call>\n{"name": "f"',
        "ends with a partial tag <tool_c",
        "a < b and <tool> are not tags",
    ],
)
def test_what_is_not_a_call_stays_content_exactly(text):
    assert split_tool_calls(text) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 1000])
@pytest.mark.parametrize(
    "text",
    [
        "Let me look.\n" + CALL + "\n" + SECOND,
        CALL,
        "x <tool_c y",
        "a <tool_call>{bad}</tool_call>",
    ],
)
def test_streaming_in_any_pieces_gives_what_the_whole_text_gives(text, size):
    whole = streamed(text, len(text))
    assert streamed(text, size) == whole
    content = "".join(v for k, v in whole if k == "content")
    calls = [v for k, v in whole if k == "call"]
    expected_content, expected_calls = split_tool_calls(text)
    assert (content.strip() if calls else content) == expected_content
    assert calls == [(c.name, c.arguments) for c in expected_calls]


def test_no_partial_tag_is_ever_sent_as_content():
    stream = ToolCallStream()
    sent = []
    for char in "ok " + CALL:
        sent += [v for k, v in stream.feed(char) if k == "content"]
    assert "".join(sent) == "ok "


def test_arguments_as_a_json_string_are_accepted():
    call = parse_call('{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert call is not None and json.loads(call.arguments) == {"a": 1}
