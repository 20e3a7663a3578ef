"""ClientPaths: the internal request's paths read as the client's (proxy/request/paths.py)."""

import pytest

from proxy.api.messages.protocol import parse_messages_request
from proxy.api.responses.protocol import parse_responses_request
from proxy.error_catalogue import APIError
from proxy.request.limits import RequestLimits
from proxy.request.paths import CHAT_PATHS, ClientPaths
from proxy.request.schema import parse_chat_request
from proxy.request.structured import structured
from proxy.transport.contract import ModelLimits


def test_chat_paths_are_the_identity():
    for path in ("messages[3].content[1].image_url", "max_tokens", "tools[2].function.name"):
        assert CHAT_PATHS(path) == path


RESPONSES = {
    "instructions": "Be brief.",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ],
}


@pytest.mark.parametrize(
    ("internal", "client"),
    [
        ("messages[0]", "instructions"),
        ("messages[0].content", "instructions"),  # a string origin: no path below it
        ("messages[1].content[0].text", "input[0].content[0].text"),
        ("messages[2].tool_calls[0]", "input[1]"),
        ("messages[3].content", "input[2].output"),
        ("messages", "input"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema.schema.properties", "text.format.schema.properties"),
        ("response_format.json_schema", "text.format"),
        ("tools[12].function.name", "tools[12].name"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("temperature", "temperature"),
        ("max_tokensx", "max_tokensx"),  # a prefix matches whole names only
    ],
)
def test_responses_paths(internal, client):
    assert parse_responses_request(RESPONSES).paths(internal) == client


def test_an_error_of_the_shared_path_names_the_clients_field_where_it_is_made():
    tool = {"type": "function", "name": "f", "parameters": {}}
    call = parse_responses_request({"input": "Hi", "tools": [tool, tool]})
    chat = parse_chat_request(call.chat_body, call.paths)
    with pytest.raises(APIError) as caught:
        structured(chat, RequestLimits().within(ModelLimits()))
    assert caught.value.param == "tools[1].name"
    assert "'tools[1].name'" in caught.value.message


def test_paths_past_the_known_messages_fall_back_to_the_last_origin():
    paths = ClientPaths((("input", False),))
    assert paths("messages[5].content") == "input"


# An Anthropic request whose messages split: a system prompt, then a user message holding a
# tool result (a tool message) and text with an image (a user message).
MESSAGES_BODY = {
    "max_tokens": 8,
    "system": [{"type": "text", "text": "Be brief."}],
    "stop_sequences": ["END"],
    "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "tool", "name": "f"},
    "messages": [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": "42"},
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            ],
        },
    ],
}


@pytest.mark.parametrize(
    ("internal", "client"),
    [
        ("messages[0].content[0]", "system[0]"),
        ("messages[1].content", "messages[0].content"),
        ("messages[2].tool_calls[0]", "messages[1].content[0]"),
        ("messages[3].content", "messages[2].content[0].content"),
        ("messages[3].tool_call_id", "messages[2].content[0].tool_use_id"),
        ("messages[4].content[0]", "messages[2].content[1]"),
        ("messages[4].content[1].image_url", "messages[2].content[2].source"),
        ("messages[4].content[1].image_url.url", "messages[2].content[2].source.url"),
        ("stop", "stop_sequences"),
        ("tools[0].function.parameters", "tools[0].input_schema"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("messages", "messages"),
    ],
)
def test_anthropic_messages_paths(internal, client):
    assert parse_messages_request(MESSAGES_BODY).paths(internal) == client


def test_a_prefix_table_matches_whole_steps_the_longest_first():
    paths = ClientPaths(prefixes={"messages[1]": "a", "messages[1].content[2]": "b"})
    assert paths("messages[1].content[2].image_url") == "b.image_url"
    assert paths("messages[1].content[20]") == "a.content[20]"
    assert paths("messages[10]") == "messages[10]"
