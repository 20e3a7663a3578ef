import base64
import json

import pytest
from helpers import data_url
from sample_images import encoded_image

from qwen_vl_backend.contract import sniff_image as sniff_format
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.media.images import decode_image, element_bytes
from qwen_vl_backend.request.chat import parse_messages


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_every_supported_format_decodes_to_rgb(fmt):
    data = encoded_image(fmt)
    assert sniff_format(data) == fmt.lower()
    image = decode_image(data, "image[0]")
    assert image.mode == "RGB" and image.size == (64, 48)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda b: b,
        lambda b: base64.b64encode(b),
        lambda b: data_url(b).encode(),
    ],
)
def test_image_elements_may_be_raw_base64_or_data_urls(wrap):
    raw = encoded_image("PNG")
    assert element_bytes(wrap(raw), "image[0]") == raw


@pytest.mark.parametrize(
    "element", [b"not an image at all!", b"%%%%", b"data:text/plain;base64,aGk="]
)
def test_garbage_elements_are_request_errors(element):
    with pytest.raises(RequestError):
        decode_image(element_bytes(element, "image[0]"), "image[0]")


def test_truncated_image_is_a_request_error():
    with pytest.raises(RequestError) as err:
        decode_image(encoded_image("PNG")[:40], "image[2]")
    assert err.value.param == "image[2]"


def _messages(*contents):
    return json.dumps([{"role": "user", "content": c} for c in contents])


def test_image_references_take_image_elements_in_order():
    red, blue = encoded_image(color=(255, 0, 0)), encoded_image("PNG", color=(0, 0, 255))
    messages = parse_messages(
        _messages([{"type": "image"}, {"type": "text", "text": "and"}], [{"type": "image"}]),
        [red, blue],
        {"max_pixels": 5000},
    )
    first, second = messages[0]["content"][0], messages[1]["content"][0]
    assert first["image"].getpixel((0, 0))[0] > 200 and second["image"].getpixel((0, 0))[2] > 200
    assert first["max_pixels"] == 5000
    assert messages[0]["content"][1] == {"type": "text", "text": "and"}


def test_inline_data_urls_and_string_content():
    messages = parse_messages(
        json.dumps(
            [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": data_url(encoded_image(), "image/jpeg")},
                        }
                    ],
                },
            ]
        ),
        [],
    )
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1]["content"][0]["type"] == "image"


@pytest.mark.parametrize(
    "messages, images, param",
    [
        ("{", [], "messages"),
        ("[]", [], "messages"),
        (json.dumps([{"role": "wizard", "content": "x"}]), [], "messages[0].role"),
        (json.dumps([{"role": "user", "content": 5}]), [], "messages[0].content"),
        (_messages([{"type": "image"}]), [], "messages[0].content[0].image_url"),
        (_messages("hi"), [encoded_image()], "image"),
        (
            _messages([{"type": "image_url", "image_url": {"url": "http://example.com/a.jpg"}}]),
            [],
            "messages[0].content[0]",
        ),
        (_messages([{"type": "input_audio"}]), [], "messages[0].content[0]"),
    ],
)
def test_malformed_messages_name_the_offending_param(messages, images, param):
    with pytest.raises(RequestError) as err:
        parse_messages(messages, images)
    assert err.value.param == param


def test_image_parts_may_narrow_the_pixel_budget_within_server_limits():
    limits = {"min_pixels": 3136, "max_pixels": 1003520}
    messages = parse_messages(
        _messages([{"type": "image", "max_pixels": 200704}, {"type": "image"}]),
        [encoded_image(), encoded_image()],
        limits,
    )
    assert messages[0]["content"][0]["max_pixels"] == 200704
    assert messages[0]["content"][1]["max_pixels"] == 1003520
    assert messages[0]["content"][0]["min_pixels"] == 3136


@pytest.mark.parametrize(
    "part, param",
    [
        ({"type": "image", "max_pixels": 10**9}, "messages[0].content[0].max_pixels"),
        ({"type": "image", "min_pixels": 10}, "messages[0].content[0].min_pixels"),
        ({"type": "image", "max_pixels": "big"}, "messages[0].content[0].max_pixels"),
        (
            {"type": "image", "min_pixels": 500000, "max_pixels": 400000},
            "messages[0].content[0].min_pixels",
        ),
    ],
)
def test_pixel_budgets_outside_server_limits_are_refused(part, param):
    with pytest.raises(RequestError) as err:
        parse_messages(
            _messages([part]), [encoded_image()], {"min_pixels": 3136, "max_pixels": 1003520}
        )
    assert err.value.param == param
