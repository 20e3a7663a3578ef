"""Tools and structured outputs through the whole stack with the random-weight checkpoint:
what constrained decoding enforces must hold even though the model's choices mean nothing."""

import json

import jsonschema
import openai
import pydantic
import pytest
import requests
from helpers import data_url, sse_payloads
from sample_images import encoded_image

SERVED = "qwen2.5-vl-7b-instruct"
IMAGE = {"type": "image_url", "image_url": {"url": data_url(encoded_image("PNG", size=(56, 56)))}}
QUESTION = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(base_url, body: dict) -> requests.Response:
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def streamed_tool_calls(response: requests.Response) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for event in sse_payloads(response.text):
        if event == "[DONE]" or not event["choices"]:
            continue
        choice = event["choices"][0]
        finish = choice["finish_reason"] or finish
        for delta in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            call["name"] += delta.get("function", {}).get("name") or ""
            call["arguments"] += delta.get("function", {}).get("arguments") or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_call_parses_and_matches_its_schema(base_url, stream):
    body = {
        "model": SERVED,
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 96,
        "seed": 7,
        "stream": stream,
    }
    response = post(base_url, body)
    assert response.status_code == 200, response.text
    if stream:
        calls, finish = streamed_tool_calls(response)
    else:
        choice = response.json()["choices"][0]
        calls = [call["function"] for call in choice["message"]["tool_calls"]]
        finish = choice["finish_reason"]
    assert finish == "tool_calls"
    (call,) = calls
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), CITY)


def test_required_tool_calls_name_a_tool_and_match_its_schema(base_url):
    response = post(
        base_url,
        {
            "model": SERVED,
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": "required",
            "max_tokens": 160,
            "temperature": 1.0,
            "seed": 11,
        },
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    for call in choice["message"]["tool_calls"]:
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def test_json_schema_with_an_image_validates(base_url):
    response = client(base_url).chat.completions.create(
        model=SERVED,
        messages=QUESTION,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
        max_tokens=64,
        seed=3,
        temperature=0.8,
    )
    jsonschema.validate(json.loads(response.choices[0].message.content), CITY)


def test_json_object_is_an_object(base_url):
    response = client(base_url).chat.completions.create(
        model=SERVED,
        messages=QUESTION,
        response_format={"type": "json_object"},
        max_tokens=64,
        seed=5,
    )
    if response.choices[0].finish_reason == "stop":  # unbounded: may need more than 64 tokens
        assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_the_sdks_parse_returns_a_parsed_object(base_url):
    class Trip(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=12)
        days: int = pydantic.Field(ge=1, le=9)

    completion = client(base_url).chat.completions.parse(
        model=SERVED, messages=QUESTION, response_format=Trip, max_tokens=64, seed=1
    )
    assert isinstance(completion.choices[0].message.parsed, Trip)


def test_tool_choice_none_gives_text(base_url):
    response = client(base_url).chat.completions.create(
        model=SERVED, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "string", "pattern": "(("}}}},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ],
)  # fmt: skip
def test_hostile_or_wrong_schemas_are_400_and_the_server_stays_healthy(base_url, fields):
    response = post(base_url, {"model": SERVED, "messages": QUESTION, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"]
    assert requests.get(f"{base_url}/ready", timeout=5).status_code == 200
