"""Request validation: what is accepted, and how pydantic errors become 400 envelopes."""

from __future__ import annotations

import pytest

from proxy.errors import APIError
from proxy.request.schema import format_param, parse_chat_request

SERVED = "qwen2.5-vl-7b-instruct"
USER_HI = {"role": "user", "content": "hi"}


def parse(body):
    return parse_chat_request(body)


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


def test_unknown_fields_are_accepted_and_listed_in_body_order():
    chat = parse(
        {
            "metadata": {"a": "b"},
            "messages": [{**USER_HI, "name": "x"}],
            "user": "u",
            "prediction": {"type": "content", "content": "x"},
            "logprobs": True,
            "service_tier": "auto",
        }
    )
    assert chat.messages[0].content == "hi"
    assert chat.ignored_fields == ["metadata", "prediction", "service_tier", "messages[0].name"]
    assert chat.user == "u"


def test_known_fields_are_not_ignored():
    body = {
        "model": SERVED,
        "messages": [USER_HI],
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "temperature": 0,
        "top_p": 1,
        "top_k": 1,
        "repetition_penalty": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "seed": 1,
        "stop": "x",
        "n": 1,
        "stream": False,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "text"},
        "user": "u",
        "min_pixels": 3136,
        "max_pixels": 3136,
    }
    assert parse(body).ignored_fields == []


def test_stream_options_include_usage():
    chat = parse({"messages": [USER_HI], "stream": True, "stream_options": {"include_usage": True}})
    assert chat.is_stream and chat.include_usage


def test_token_limit_prefers_max_completion_tokens():
    assert parse({"messages": [USER_HI], "max_tokens": 9}).token_limit == 9
    assert (
        parse({"messages": [USER_HI], "max_tokens": 9, "max_completion_tokens": 4}).token_limit == 4
    )


def test_model_is_kept_for_the_app_to_resolve():
    assert parse({"model": "any-name", "messages": [USER_HI]}).model == "any-name"


@pytest.mark.parametrize(
    "part, kind",
    [
        ({"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "f"}}, "file"),
        ({"type": "refusal", "refusal": "no"}, "refusal"),
        ({"type": "image", "image": "x"}, "image"),
        ({"type": "audio", "audio": "x"}, "audio"),
        ({"type": 7}, "7"),
    ],
)
def test_unsupported_content_part_types_are_named(part, kind):
    body = {
        "messages": [
            USER_HI,
            {"role": "user", "content": [{"type": "text", "text": "a"}, part]},
        ]
    }
    error = error_for(body)
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert (error.param, error.code) == ("messages[1].content[1]", "unsupported_content_type")
    assert f"'{kind}'" in error.message and "messages[1].content[1]" in error.message


def test_unsupported_part_in_assistant_turn_is_named_too():
    body = {
        "messages": [
            {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {}}]},
        ]
    }
    error = error_for(body)
    assert (error.param, error.code) == ("messages[0].content[0]", "unsupported_content_type")


def test_part_without_type_is_missing_type():
    error = error_for({"messages": [{"role": "user", "content": [{"text": "a"}]}]})
    assert (error.param, error.code) == (
        "messages[0].content[0].type",
        "missing_required_parameter",
    )


def test_part_that_is_not_an_object_is_invalid():
    error = error_for({"messages": [{"role": "user", "content": ["a"]}]})
    assert (error.param, error.code) == ("messages[0].content[0]", "invalid_value")


def test_image_url_pixel_fields_and_detail():
    chat = parse(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "https://x/a.png",
                                "detail": "low",
                                "min_pixels": 3136,
                                "max_pixels": 50176,
                            },
                        }
                    ],
                }
            ]
        }
    )
    image_url = chat.messages[0].content[0].image_url
    assert (image_url.detail, image_url.min_pixels, image_url.max_pixels) == ("low", 3136, 50176)


def test_top_logprobs_requires_logprobs():
    error = error_for({"messages": [USER_HI], "top_logprobs": 3})
    assert (error.status, error.param, error.code) == (400, "top_logprobs", "invalid_value")
    error = error_for({"messages": [USER_HI], "top_logprobs": 3, "logprobs": False})
    assert error.param == "top_logprobs"
    assert parse({"messages": [USER_HI], "top_logprobs": 0, "logprobs": True}).top_logprobs == 0


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema", "json_schema": {}}, "response_format.json_schema.name"),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_malformed_response_formats_are_400(response_format, param):
    error = error_for({"messages": [USER_HI], "response_format": response_format})
    assert (error.status, error.param) == (400, param)


def test_text_response_format_is_accepted():
    assert parse({"messages": [USER_HI], "response_format": {"type": "text"}})


def test_sixteen_stop_strings_are_accepted():
    assert len(parse({"messages": [USER_HI], "stop": ["s"] * 16}).stop) == 16


@pytest.mark.parametrize("n", [0, -1, 2**31])
def test_n_outside_its_type_is_400(n):
    error = error_for({"messages": [USER_HI], "n": n})
    assert (error.status, error.param, error.code) == (400, "n", "invalid_value")


def test_n_above_one_is_passed_to_the_model():
    """The model owns the cap (its max_choices parameter) and refuses beyond it."""
    assert parse({"messages": [USER_HI], "n": 3}).n == 3


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        (
            {"messages": [USER_HI, {"role": "user", "content": 42}]},
            "messages[1].content",
            "invalid_type",
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
            "unsupported_content_type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "x", "detail": "max"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.detail",
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
            "invalid_type",
        ),
        ({"messages": [USER_HI], "temperature": 3}, "temperature", "invalid_value"),
        ({"messages": [USER_HI], "top_p": 0}, "top_p", "invalid_value"),
        ({"messages": [USER_HI], "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": [USER_HI], "max_tokens": "many"}, "max_tokens", "invalid_type"),
        ({"messages": [USER_HI], "stop": [1, 2]}, "stop[0]", "invalid_type"),
        ({"messages": [USER_HI], "stop": ["s"] * 17}, "stop", "invalid_value"),
        ({"messages": [USER_HI], "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"messages": [USER_HI], "frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        (
            {"messages": [USER_HI], "top_logprobs": 21, "logprobs": True},
            "top_logprobs",
            "invalid_value",
        ),
        (
            {"messages": [USER_HI], "top_logprobs": -1, "logprobs": True},
            "top_logprobs",
            "invalid_value",
        ),
        ({"messages": [USER_HI], "logprobs": "maybe"}, "logprobs", "invalid_type"),
        ({"messages": [USER_HI], "user": 5}, "user", "invalid_type"),
        ({"messages": [USER_HI], "max_pixels": 0}, "max_pixels", "invalid_value"),
        (
            {"messages": [USER_HI], "response_format": {}},
            "response_format.type",
            "missing_required_parameter",
        ),
        (
            {"messages": [USER_HI], "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
            "invalid_type",
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
        "Invalid type for 'messages[0].content': expected a string or an array, "
        "but got an integer instead."
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


@pytest.mark.parametrize(
    "field, value, expected, got",
    [
        ("stream", "yes", "a boolean", "a string"),
        ("stream", 1, "a boolean", "an integer"),
        ("temperature", "0.5", "a number", "a string"),
        ("max_tokens", 5.5, "an integer", "a number"),
        ("seed", True, "an integer", "a boolean"),
    ],
)
def test_values_of_the_wrong_json_type_are_not_coerced(field, value, expected, got):
    """OpenAI answers `Invalid type for 'stream'` instead of reading "yes" as true."""
    error = error_for({"messages": [USER_HI], field: value})
    assert (error.status, error.param, error.code) == (400, field, "invalid_type")
    assert (
        error.message == f"Invalid type for '{field}': expected {expected}, but got {got} instead."
    )


def test_integers_still_count_as_numbers():
    assert parse({"messages": [USER_HI], "temperature": 1, "top_p": 1}).temperature == 1.0


@pytest.mark.parametrize("role", ["user", "system", "tool", "assistant"])
def test_null_content_is_refused_except_on_assistant_tool_calls(role):
    error = error_for({"messages": [USER_HI, {"role": role, "content": None}]})
    assert (error.status, error.param) == (400, "messages[1]")
    assert "tool_calls" in error.message


def test_assistant_turn_with_tool_calls_may_have_null_content():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert parse(
        {
            "messages": [
                USER_HI,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                USER_HI,
            ]
        }
    )
