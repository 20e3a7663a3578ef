"""Odd and hostile images: decoded the way a viewer shows them, or refused with a RequestError."""

import json

import numpy as np
import pytest
from hostile_samples import png_header_only
from PIL import Image
from sample_images import encode

from qwen_vl_backend.contract import ModelLimits
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.media.images import decode_image
from qwen_vl_backend.request.chat import parse_messages


@pytest.mark.parametrize(
    "name, data, expected_pixel",
    [
        ("cmyk jpeg", encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG"), None),
        (
            "16-bit png",
            encode(Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)), "PNG"),
            (255, 255, 255),
        ),
        (
            "half 16-bit",
            encode(Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), "PNG"),
            (128, 128, 128),
        ),
        (
            "transparent png",
            encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "PNG"),
            (255, 255, 255),
        ),
        ("grey+alpha", encode(Image.new("LA", (16, 16), (0, 255)), "PNG"), (0, 0, 0)),
        ("palette gif", encode(Image.new("P", (16, 16), 3), "GIF"), None),
        ("1x1", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (9, 9, 9)),
    ],
)
def test_unusual_modes_decode_to_rgb(name, data, expected_pixel):
    image = decode_image(data, "image[0]")
    assert image.mode == "RGB"
    if expected_pixel:
        assert image.getpixel((0, 0)) == pytest.approx(expected_pixel, abs=1)


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((250, 0, 0), (0, 250, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, "image[0]").getpixel((0, 0))[0] > 200


@pytest.mark.parametrize(
    "data, code",
    [
        (png_header_only(100_000, 100_000), "image_too_large"),  # 10 gigapixels claimed
        (png_header_only(1, 10_000), "invalid_image"),  # 1:10000 aspect ratio
        (encode(Image.new("RGB", (64, 64)), "PNG")[:-30], "invalid_image"),  # truncated
        (b"\xff\xd8\xff" + b"\0" * 64, "invalid_image"),  # JPEG magic, garbage after
        (b"GIF89a" + b"\xff" * 32, "invalid_image"),
    ],
)
def test_hostile_images_are_refused_before_decoding(data, code):
    with pytest.raises(RequestError) as err:
        decode_image(data, "image[3]")
    assert err.value.code == code and err.value.param == "image[3]"


def test_decoded_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(RequestError, match="at most 5000 pixels"):
        decode_image(data, "image[0]", ModelLimits(max_source_pixels=5000))


def test_images_per_request_are_capped_across_references_and_inline_urls():
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    content = [{"type": "image"}] * 3
    with pytest.raises(RequestError) as err:
        parse_messages(
            json.dumps([{"role": "user", "content": content}]),
            [png] * 3,
            None,
            ModelLimits(max_images=2),
        )
    assert err.value.code == "too_many_images"
