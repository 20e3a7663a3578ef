"""tools, tool_choice and response_format → the model's `tools` input and `structured`
constraint; every schema a client sends is bounded and meta-validated."""

import json

import pytest

from proxy.error_catalogue import APIError
from proxy.request.limits import RequestLimits
from proxy.request.schema import parse_chat_request
from proxy.request.structured import structured
from proxy.transport.contract import ModelLimits

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def of(**fields):
    return structured(
        parse_chat_request({"messages": USER, **fields}), RequestLimits().within(ModelLimits())
    )


def refused(**fields) -> APIError:
    with pytest.raises(APIError) as raised:
        of(**fields)
    assert raised.value.status == 400
    return raised.value


def test_no_tools_no_format_is_plain_text():
    result = of()
    assert (result.tools_json, result.constraint, result.parse_tool_calls) == (None, None, False)


def test_auto_puts_tools_in_the_prompt_without_forcing_a_call():
    result = of(tools=[WEATHER, TIME])
    assert json.loads(result.tools_json) == [WEATHER, TIME]
    assert result.constraint is None and result.parse_tool_calls


def test_none_leaves_tools_out():
    result = of(tools=[WEATHER], tool_choice="none")
    assert (result.tools_json, result.constraint, result.parse_tool_calls) == (None, None, False)


def test_required_forces_calls_of_any_tool():
    result = of(tools=[WEATHER, TIME], tool_choice="required")
    assert result.constraint == {
        "type": "tool_calls",
        "tools": [
            {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]},
            {"name": "get_time", "parameters": {}},
        ],
        "parallel": True,
    }
    assert not of(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False).constraint[
        "parallel"
    ]


def test_a_named_choice_forces_exactly_that_call():
    choice = {"type": "function", "function": {"name": "get_time"}}
    result = of(tools=[WEATHER, TIME], tool_choice=choice)
    assert result.constraint == {
        "type": "tool_calls",
        "tools": [{"name": "get_time", "parameters": {}}],
        "parallel": False,
    }


def test_response_formats():
    assert of(response_format={"type": "text"}).constraint is None
    assert of(response_format={"type": "json_object"}).constraint == {"type": "json_object"}
    spec = {"name": "answer", "schema": SCHEMA, "strict": True}
    assert of(response_format={"type": "json_schema", "json_schema": spec}).constraint == {
        "type": "json_schema",
        "schema": SCHEMA,
        "strict": True,
    }


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
         "tools[0].function.parameters"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"response_format": json_schema({"type": "string", "pattern": "(unclosed"})},
         "response_format.json_schema.schema"),
        ({"response_format": json_schema({"minLength": -1})}, "response_format.json_schema.schema"),
        ({"response_format": json_schema(nested(40))}, "response_format.json_schema.schema"),
        ({"response_format": json_schema({"enum": ["x" * 1000] * 40})},
         "response_format.json_schema.schema"),
        ({"tools": [TIME], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
    ],
)  # fmt: skip
def test_what_the_model_could_not_honour_is_a_400_naming_it(fields, param):
    with pytest.raises(APIError) as raised:
        structured(
            parse_chat_request({"messages": USER, **fields}), RequestLimits().within(ModelLimits())
        )
    assert (raised.value.status, raised.value.param) == (400, param)


def test_too_many_tools():
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(3)]
    chat = parse_chat_request({"messages": USER, "tools": tools})
    with pytest.raises(APIError) as raised:
        structured(chat, RequestLimits(max_tools=2))
    assert raised.value.param == "tools"
