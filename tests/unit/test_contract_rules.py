"""Contract v2: the rules both sides of the gRPC boundary apply are built from one definition
(qwen_vl_backend/contract.py), so they cannot disagree. Each test feeds the same values to the
proxy's check and the model's and requires the same verdict."""

import json

import pytest

from proxy.error_catalogue import APIError
from proxy.request.schema import parse_chat_request
from proxy.request.tool_calls import split_tool_calls
from proxy.transport.contract import (
    BOOLEAN,
    INT32_MAX,
    REPETITION_GUARD_FIELDS,
    SAMPLING_FIELDS,
    TOKEN_IDS,
    TOKEN_MAP,
    ModelLimits,
)
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.params import check_structured_limits, parse_sampling_parameters

USER = [{"role": "user", "content": "hi"}]
# The chat field that carries each contract row (max_tokens also arrives as
# max_completion_tokens; both go through the same row).
CHAT_NAME = {name: name for name in SAMPLING_FIELDS}


def _edges(rule) -> list:
    """Values on and just beyond each end of a rule's range, and of the wrong kind."""
    if rule.kind == BOOLEAN:
        return [True, False, None, 1, 0, "true", [True]]
    if rule.kind == TOKEN_IDS:
        full = list(range(rule.max_items))
        edges = [[], [0], [INT32_MAX], [INT32_MAX + 1], [-1], [1.0], [True], ["1"], "1", 5]
        return [*edges, None, full, [*full, 0], {"1": 1}]
    if rule.kind == TOKEN_MAP:
        full = {str(i): 0 for i in range(rule.max_items)}
        return [
            {},
            {"0": rule.low},
            {"1": rule.high},
            {"1": rule.low - 1e-6},
            {"1": rule.high + 1e-6},
            {"1": True},
            {"1": "1"},
            {"x": 1},
            {"-1": 1},
            {"+1": 1},
            {"\uff11": 1},  # a fullwidth digit
            {str(INT32_MAX): 1},
            {str(INT32_MAX + 1): 1},
            full,
            {**full, "99999": 0},
            [],
            None,
        ]
    step = 1 if rule.integer else 1e-6
    values = [rule.low, rule.high, rule.low - step, rule.high + step, "1", True, None]
    if not rule.integer:
        values += [(rule.low + rule.high) / 2, float("nan")]
    else:
        values += [rule.low + 0.5]
    return values


def _proxy_accepts(name: str, value) -> bool:
    body = {"messages": USER, CHAT_NAME[name]: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    try:
        parse_chat_request(body)
    except APIError:
        return False
    return True


def _model_accepts(name: str, value) -> bool:
    raw = {name: value, **({"logprobs": True} if name == "top_logprobs" else {})}
    try:
        parse_sampling_parameters(json.dumps(raw))
    except RequestError:
        return False
    except ValueError:  # NaN is not JSON: the proxy never sends it
        return False
    return True


@pytest.mark.parametrize("name", sorted(SAMPLING_FIELDS))
def test_both_sides_take_the_same_sampling_values(name):
    rule = SAMPLING_FIELDS[name]
    for value in _edges(rule):
        if isinstance(value, float) and value != value:  # NaN: JSON cannot carry it
            continue
        assert _proxy_accepts(name, value) == _model_accepts(name, value), (name, value)


@pytest.mark.parametrize("name", sorted(REPETITION_GUARD_FIELDS))
def test_both_sides_take_the_same_repetition_guards(name):
    """The guard's two fields, each at its edges with the other one valid; a refusal names
    the field below `repetition_guard` on both sides."""
    valid = {"ngram": 4, "max_repeats": 3}
    for value in _edges(REPETITION_GUARD_FIELDS[name]):
        if isinstance(value, float) and value != value:
            continue
        guard = {**valid, name: value}
        if value is None:
            del guard[name]
        try:
            parse_chat_request({"messages": USER, "repetition_guard": guard})
            proxy_ok = True
        except APIError as exc:
            assert exc.param.startswith("repetition_guard"), exc.param
            proxy_ok = False
        try:
            parse_sampling_parameters(json.dumps({"repetition_guard": guard}))
            model_ok = True
        except RequestError as exc:
            assert exc.param.startswith("repetition_guard"), exc.param
            model_ok = False
        assert proxy_ok == model_ok, (name, value)


@pytest.mark.parametrize("guard", [None, {"ngram": 0}, {"ngram": 2}, [], "on"])
def test_both_sides_take_the_same_repetition_guard_shapes(guard):
    try:
        parse_chat_request({"messages": USER, "repetition_guard": guard})
        proxy_ok = True
    except APIError:
        proxy_ok = False
    try:
        parse_sampling_parameters(json.dumps({"repetition_guard": guard}))
        model_ok = True
    except RequestError:
        model_ok = False
    assert proxy_ok == model_ok == (guard is None or guard == {"ngram": 0})


def test_every_sampling_field_the_proxy_sends_has_a_contract_row():
    from proxy.request.schema import SAMPLING_FIELDS as forwarded

    assert set(forwarded) <= set(SAMPLING_FIELDS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "interactive"),  # absent: the default class
        ("interactive", "interactive"),
        ("batch", "batch"),
        ("", None),
        ("Batch", None),
        (" batch", None),
        ("urgent", None),
    ],
)
def test_both_sides_take_the_same_priority_classes(value, expected):
    """The proxy's `priority` field and the model's `priority` input take the contract's class
    names and nothing else; a refusal names `priority` on both sides."""
    from qwen_vl_backend.request.prepare import parse_priority

    try:
        proxy_class = parse_chat_request({"messages": USER, "priority": value}).priority_class
    except APIError as exc:
        assert exc.param == "priority"
        proxy_class = None
    try:
        model_class = parse_priority(value)
    except RequestError as exc:
        assert exc.param == "priority"
        model_class = None
    assert proxy_class == model_class == expected


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}  # one level per wrap
    return schema


@pytest.mark.parametrize("depth_over", [-1, 0, 1])
def test_schema_depth_and_tool_count_limits_agree(depth_over):
    """The model's own check (what a direct Triton client meets) and the proxy's use the same
    walker and numbers from ModelLimits."""
    from proxy.request.limits import RequestLimits
    from proxy.request.structured import check_schema

    model = ModelLimits()
    schema = _nested(model.max_schema_depth + depth_over)
    proxy_ok = model_ok = True
    try:
        check_schema(schema, "response_format", RequestLimits().within(model))
    except APIError:
        proxy_ok = False
    raw = {"structured": {"type": "json_schema", "schema": schema}}
    structured = parse_sampling_parameters(json.dumps(raw)).structured
    try:
        check_structured_limits(structured, model)
    except RequestError:
        model_ok = False
    assert proxy_ok == model_ok == (depth_over <= 0)


def test_the_tool_call_tags_the_model_writes_are_the_ones_the_proxy_parses():
    from qwen_vl_backend.contract import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

    text = f'{TOOL_CALL_OPEN}\n{{"name": "f", "arguments": {{}}}}\n{TOOL_CALL_CLOSE}'
    content, calls = split_tool_calls(text)
    assert [call.name for call in calls] == ["f"] and not content


def test_the_roles_the_proxy_takes_are_the_models_plus_developer():
    """`developer` (OpenAI's newer name for `system`) is the one declared difference: the
    proxy maps it to `system` before the model sees it."""
    from typing import get_args

    from proxy.request.schema import ChatMessage
    from proxy.transport.contract import ROLES

    taken = set(get_args(ChatMessage.model_fields["role"].annotation))
    assert taken == {*ROLES, "developer"}


@pytest.mark.parametrize(
    ("data", "image", "video"),
    [
        (b"\xff\xd8\xff\xe0" + bytes(8), "jpeg", None),
        (b"RIFF\0\0\0\0WEBPVP8 ", "webp", None),
        (b"\0\0\0\x18ftypmp42" + bytes(4), None, "iso"),
        (b"\x1a\x45\xdf\xa3" + bytes(8), None, "ebml"),
        (b"data:video/jpeg;base64,AAAA", None, "frames"),
        (b"<svg></svg>", None, None),
    ],
)
def test_both_sides_sniff_media_alike(data, image, video):
    from proxy.media.images import is_known_image
    from proxy.media.videos import is_known_video
    from qwen_vl_backend.contract import sniff_image, sniff_video

    assert sniff_image(data) == image and is_known_image(data) == (image is not None)
    assert sniff_video(data) == video and is_known_video(data) == (video is not None)


@pytest.mark.parametrize(
    ("url", "proxy_ok"),
    [
        ("data:image/png;base64,iVBORw0KGgo=", True),
        ("DATA:image/PNG;charset=x;base64,iVBORw0KGgo=", True),
        ("data:image/png,iVBORw0KGgo=", False),  # not base64
        ("data:;base64,iVBORw0KGgo=", False),
    ],
)
def test_both_sides_parse_data_urls_alike(url, proxy_ok):
    from proxy.transport.contract import split_data_url as proxy_parse
    from qwen_vl_backend.contract import split_data_url as model_parse
    from qwen_vl_backend.media.images import data_url_bytes

    assert (proxy_parse(url) is not None) == proxy_ok == (model_parse(url) is not None)
    if proxy_ok:
        assert data_url_bytes(url, "p").startswith(b"\x89PNG")
    else:
        with pytest.raises(RequestError):
            data_url_bytes(url, "p")
