"""OpenAI-style chat messages → the message list Qwen's chat template and qwen-vl-utils take.

Image parts are `{"type": "image"}` (the next element of the `image` input, in order of
appearance) or `{"type": "image_url", "image_url": {"url": "data:..."}}` (inline).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from PIL import Image

from .errors import RequestError
from .images import data_url_bytes, decode_image, element_bytes

ROLES = {"system", "user", "assistant", "tool"}


class _ImageSource:
    """Hands out decoded images from the `image` input in order, counting what was used."""

    def __init__(self, elements: Sequence[bytes]):
        self._elements = list(elements)
        self.used = 0

    def next(self, param: str) -> Image.Image:
        if self.used >= len(self._elements):
            raise RequestError("message refers to more images than the image input holds", param)
        index = self.used
        self.used += 1
        return decode_image(element_bytes(self._elements[index], f"image[{index}]"), f"image[{index}]")


def _image_url(part: dict, param: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise RequestError("image_url part needs a url", param)
    return url


def _convert_part(part: Any, param: str, images: _ImageSource, vision: dict) -> dict:
    if not isinstance(part, dict):
        raise RequestError("content part must be an object", param)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError("text part needs a string 'text'", param)
        return {"type": "text", "text": part["text"]}
    if kind == "image":
        budget = pixel_budget(part, vision, param)
        return {"type": "image", "image": images.next(param), **budget}
    if kind == "image_url":
        url = _image_url(part, param)
        if not url.startswith("data:"):
            raise RequestError(
                "the model does not fetch image URLs; send the bytes in the image input", param)
        budget = pixel_budget(part, vision, param)
        return {"type": "image", "image": decode_image(data_url_bytes(url, param), param), **budget}
    raise RequestError(f"unsupported content part type {kind!r}", param)


def pixel_budget(part: dict, limits: dict, param: str) -> dict:
    """The part's own min/max_pixels, allowed only inside the server's [min, max] range."""
    low, high = limits.get("min_pixels"), limits.get("max_pixels")
    budget = {k: v for k, v in (("min_pixels", low), ("max_pixels", high)) if v is not None}
    for key in ("min_pixels", "max_pixels"):
        value = part.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"'{key}' must be an integer", f"{param}.{key}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise RequestError(f"'{key}' must be between {low} and {high}", f"{param}.{key}")
        budget[key] = value
    if budget.get("min_pixels", 0) > budget.get("max_pixels", float("inf")):
        raise RequestError("'min_pixels' must not exceed 'max_pixels'", f"{param}.min_pixels")
    return budget


def _convert_message(message: Any, index: int, images: _ImageSource, vision: dict) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError("message must be an object", param)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(f"role must be one of {sorted(ROLES)}", f"{param}.role")
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise RequestError("content must be a string or a list of parts", f"{param}.content")
    parts = [_convert_part(p, f"{param}.content[{j}]", images, vision) for j, p in enumerate(content)]
    return {"role": role, "content": parts}


def parse_messages(messages_json: str, image_elements: Sequence[bytes],
                   vision: dict | None = None) -> list[dict]:
    """Validate and convert; `vision` holds the server's min_pixels/max_pixels, the default
    budget of every image and the bounds of the budgets image parts may ask for."""
    try:
        messages = json.loads(messages_json)
    except ValueError as exc:
        raise RequestError("messages is not valid JSON", "messages") from exc
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    images = _ImageSource(image_elements)
    converted = [_convert_message(m, i, images, vision or {}) for i, m in enumerate(messages)]
    if images.used != len(image_elements):
        raise RequestError(
            f"image input holds {len(image_elements)} images but messages refer to {images.used}",
            "image")
    return converted


def decode_image_elements(image_elements: Sequence[bytes]) -> list[Image.Image]:
    """All images of the `image` input, for the ready-prompt (`text_input`) path."""
    source = _ImageSource(image_elements)
    return [source.next("image") for _ in image_elements]
