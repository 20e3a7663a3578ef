"""Request validation: what is accepted, and how pydantic errors become 400 envelopes."""

from __future__ import annotations

import pytest

from proxy.errors import APIError
from proxy.schema import format_param, parse_chat_request

SERVED = "qwen2.5-vl-7b-instruct"
USER_HI = {"role": "user", "content": "hi"}


def parse(body):
    return parse_chat_request(body, SERVED)


def error_for(body) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    return caught.value


def test_minimal_request():
    chat = parse({"messages": [USER_HI]})
    assert chat.model is None
    assert chat.is_stream is False
    assert chat.include_usage is False
    assert chat.token_limit is None


def test_unknown_fields_are_accepted():
    chat = parse(
        {"messages": [{**USER_HI, "name": "x"}], "user": "u", "tools": [], "logprobs": True}
    )
    assert chat.messages[0].content == "hi"


def test_stream_options_include_usage():
    chat = parse({"messages": [USER_HI], "stream": True, "stream_options": {"include_usage": True}})
    assert chat.is_stream and chat.include_usage


def test_token_limit_prefers_max_completion_tokens():
    assert parse({"messages": [USER_HI], "max_tokens": 9}).token_limit == 9
    assert (
        parse({"messages": [USER_HI], "max_tokens": 9, "max_completion_tokens": 4}).token_limit == 4
    )


def test_matching_model_is_accepted():
    assert parse({"model": SERVED, "messages": [USER_HI]}).model == SERVED


def test_other_model_is_404_model_not_found():
    error = error_for({"model": "qwen2.5-vl-72b-instruct", "messages": [USER_HI]})
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert SERVED in error.message


@pytest.mark.parametrize("n", [0, 2, 5])
def test_n_other_than_one_is_400(n):
    error = error_for({"messages": [USER_HI], "n": n})
    assert (error.status, error.param, error.code) == (400, "n", "unsupported_parameter")
    assert "n=1" in error.message


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": "hi"}, "messages", "invalid_value"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        (
            {"messages": [USER_HI, {"role": "user", "content": 42}]},
            "messages[1].content",
            "invalid_value",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}
                ]
            },
            "messages[0].content[1].text",
            "missing_required_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
            "messages[0].content[0]",
            "invalid_value",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"detail": "low"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
            "missing_required_parameter",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
            "invalid_value",
        ),
        ({"messages": [USER_HI], "temperature": 3}, "temperature", "invalid_value"),
        ({"messages": [USER_HI], "top_p": 0}, "top_p", "invalid_value"),
        ({"messages": [USER_HI], "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": [USER_HI], "max_tokens": "many"}, "max_tokens", "invalid_value"),
        ({"messages": [USER_HI], "stop": [1, 2]}, "stop[0]", "invalid_value"),
        (
            {"messages": [USER_HI], "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
            "invalid_value",
        ),
    ],
)
def test_validation_errors_name_the_offending_param(body, param, code):
    error = error_for(body)
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert error.code == code
    assert param in error.message
    assert "pydantic" not in error.message and "http" not in error.message
    assert "\n" not in error.message


def test_stop_list_error_points_into_the_list():
    error = error_for({"messages": [USER_HI], "stop": ["ok", 3]})
    assert error.param == "stop[1]"


def test_union_mismatch_names_every_accepted_type():
    error = error_for({"messages": [{"role": "user", "content": 42}]})
    assert error.message == (
        "Invalid value for 'messages[0].content': "
        "Input should be a valid string or Input should be a valid list."
    )


def test_missing_message_says_missing():
    assert error_for({}).message == "Missing required parameter: 'messages'."


@pytest.mark.parametrize(
    "path, text",
    [
        (["messages", 0, "content", 2, "image_url"], "messages[0].content[2].image_url"),
        (["temperature"], "temperature"),
        ([], ""),
    ],
)
def test_format_param(path, text):
    assert format_param(path) == text
