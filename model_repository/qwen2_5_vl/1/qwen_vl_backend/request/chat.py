"""OpenAI-style chat messages → the message list Qwen's chat template and qwen-vl-utils take.

Image parts are `{"type": "image"}` (the next element of the `image` input, in order of
appearance) or `{"type": "image_url", "image_url": {"url": "data:..."}}` (inline). Either may
carry `min_pixels` / `max_pixels`, a resize budget inside the server's own bounds.

Video parts are `{"type": "video"}` (the next element of the `video` input) or
`{"type": "video_url", "video_url": {"url": "data:video/...;base64,..."}}` (inline); either may
carry `fps`, `max_frames`, `min_pixels`, `max_pixels`, `total_pixels` inside the server's
bounds. Videos are decoded and resized here (`videos.py`), on the preparation pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..contract import ROLES, ModelLimits, video_option_bounds
from ..errors import RequestError
from ..media.images import DEFAULT_LIMITS, data_url_bytes, decode_image, element_bytes
from ..media.videos import Video, VideoOptions, load_video
from .tools import tool_calls


class _ElementSource:
    """Hands out one kind's media in order of appearance: the next element of its input by
    reference, or an inline data URL; at most `limit` per request, counted either way."""

    noun = ""  # "image", "video": the input's name too

    def __init__(self, elements: Sequence[bytes], limit: int):
        if len(elements) > limit:
            raise RequestError(self._too_many(limit), self.noun, f"too_many_{self.noun}s")
        self._elements = list(elements)
        self._limit = limit
        self.used = 0
        self.decoded = 0

    def _take(self, param: str) -> bytes:
        if self.used >= len(self._elements):
            raise RequestError(
                f"message refers to more {self.noun}s than the {self.noun} input holds", param
            )
        self.used += 1
        return self._elements[self.used - 1]

    def _count(self, param: str) -> None:
        self.decoded += 1
        if self.decoded > self._limit:
            raise RequestError(self._too_many(self._limit), param, f"too_many_{self.noun}s")

    def _too_many(self, limit: int) -> str:
        return f"at most {limit} {self.noun}s per request"

    def check_all_used(self) -> None:
        if self.used != len(self._elements):
            raise RequestError(
                f"{self.noun} input holds {len(self._elements)} {self.noun}s but messages refer "
                f"to {self.used}",
                self.noun,
            )


class _ImageSource(_ElementSource):
    noun = "image"

    def __init__(self, elements: Sequence[bytes], limits: ModelLimits):
        super().__init__(elements, limits.max_images)
        self._limits = limits

    def next(self, param: str, budget: dict | None = None) -> Image.Image:
        """The next `image` element, decoded (and resized into `budget`); errors name `param`."""
        return self._decode(element_bytes(self._take(param), param), param, budget)

    def inline(self, url: str, param: str, budget: dict | None = None) -> Image.Image:
        return self._decode(data_url_bytes(url, param), param, budget)

    def _decode(self, data: bytes, param: str, budget: dict | None) -> Image.Image:
        self._count(param)
        return decode_image(data, param, self._limits, budget)


class _VideoSource(_ElementSource):
    noun = "video"

    def __init__(self, elements: Sequence[bytes], limits: ModelLimits, timeout_s: float):
        super().__init__(elements, limits.max_videos)
        self._limits = limits
        self._timeout_s = timeout_s

    def options(self, part: dict, param: str) -> VideoOptions:
        """The server's defaults, narrowed by the part's own keys (errors name `param.<key>`)."""
        limits = self._limits
        values = {
            "fps": limits.video_fps,
            "max_frames": limits.max_video_frames,
            "min_pixels": limits.min_pixels,
            "max_pixels": limits.max_pixels,
            "total_pixels": limits.video_total_pixels,
        }
        for key, (low, high, _) in video_option_bounds(limits).items():
            value = part.get(key)
            if value is None:
                continue
            number = int | float if key == "fps" else int
            if isinstance(value, bool) or not isinstance(value, number):
                kind = "a number" if key == "fps" else "an integer"
                raise RequestError(f"'{key}' must be {kind}", f"{param}.{key}")
            if key == "fps" and not low < value <= high:
                raise RequestError(f"'fps' must be above 0 and at most {high:g}", f"{param}.fps")
            if key != "fps" and not low <= value <= high:
                raise RequestError(f"'{key}' must be between {low} and {high}", f"{param}.{key}")
            values[key] = value
        if values["min_pixels"] > values["max_pixels"]:
            raise RequestError("'min_pixels' must not exceed 'max_pixels'", f"{param}.min_pixels")
        return VideoOptions(**values, timeout_s=self._timeout_s)

    def next(self, options: VideoOptions, param: str) -> Video:
        return self._decode(self._take(param), options, param)

    def inline(self, url: str, options: VideoOptions, param: str) -> Video:
        return self._decode(url, options, param)

    def _decode(self, element, options: VideoOptions, param: str) -> Video:
        self._count(param)
        return load_video(element, param, self._limits, options)


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


class _Converter:
    def __init__(self, images: _ImageSource, vision: dict, videos: _VideoSource):
        self.images = images
        self.vision = vision
        self.videos = videos

    def message(self, message: Any, index: int) -> dict:
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError("message must be an object", param)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"role must be one of {sorted(ROLES)}", f"{param}.role")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            content = [self.part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
        elif not isinstance(content, str):
            raise RequestError("content must be a string or a list of parts", f"{param}.content")
        converted = {"role": role, "content": content}
        calls = tool_calls(message, param) if role == "assistant" else None
        if calls:
            converted["tool_calls"] = calls
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            converted["tool_call_id"] = message["tool_call_id"]
        return converted

    def part(self, part: Any, param: str) -> dict:
        if not isinstance(part, dict):
            raise RequestError("content part must be an object", param)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("text part needs a string 'text'", param)
            return {"type": "text", "text": part["text"]}
        if kind == "image":
            budget = pixel_budget(part, self.vision, param)
            # The client sent this image as an image_url part; the proxy sent its bytes.
            image = self.images.next(f"{param}.image_url", budget)
            return {"type": "image", "image": image, **budget}
        if kind == "image_url":
            url = _image_url(part, param)
            if not url.startswith("data:"):
                raise RequestError(
                    "the model does not fetch image URLs; send the bytes in the image input", param
                )
            budget = pixel_budget(part, self.vision, param)
            image = self.images.inline(url, f"{param}.image_url", budget)
            return {"type": "image", "image": image, **budget}
        if kind == "video":
            # The client sent this video as a video_url part; the proxy sent its bytes.
            options = self.videos.options(part, f"{param}.video_url")
            return {"type": "video", "video": self.videos.next(options, f"{param}.video_url")}
        if kind == "video_url":
            value = part.get("video_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str):
                raise RequestError("video_url part needs a url", param)
            if not url.startswith("data:"):
                raise RequestError(
                    "the model does not fetch video URLs; send the bytes in the video input", param
                )
            keys = {**part, **value} if isinstance(value, dict) else part
            options = self.videos.options(keys, f"{param}.video_url")
            video = self.videos.inline(url, options, f"{param}.video_url")
            return {"type": "video", "video": video}
        raise RequestError(
            f"unsupported content part type {kind!r}", param, "unsupported_content_type"
        )


def _image_url(part: dict, param: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise RequestError("image_url part needs a url", param)
    return url


def parse_messages(
    messages_json: str,
    image_elements: Sequence[bytes],
    vision: dict | None = None,
    limits: ModelLimits = DEFAULT_LIMITS,
    video_elements: Sequence[bytes] = (),
    video_timeout_s: float = 30.0,
) -> list[dict]:
    """Validate and convert. `vision` holds the server's min_pixels/max_pixels: the default
    budget of every image and the bounds of the budgets image parts may ask for."""
    try:
        messages = json.loads(messages_json)
    except ValueError as exc:
        raise RequestError("messages is not valid JSON", "messages") from exc
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    images = _ImageSource(image_elements, limits)
    videos = _VideoSource(video_elements, limits, video_timeout_s)
    converter = _Converter(images, vision or {}, videos)
    converted = [converter.message(m, i) for i, m in enumerate(messages)]
    videos.check_all_used()
    images.check_all_used()
    return converted


def decode_image_elements(
    image_elements: Sequence[bytes],
    limits: ModelLimits = DEFAULT_LIMITS,
    budget: dict | None = None,
) -> list[Image.Image]:
    """All images of the `image` input, for the ready-prompt (`text_input`) path."""
    source = _ImageSource(image_elements, limits)
    return [source.next(f"image[{index}]", budget) for index in range(len(image_elements))]


def decode_video_elements(
    video_elements: Sequence[bytes], limits: ModelLimits = DEFAULT_LIMITS, timeout_s: float = 30.0
) -> list[Video]:
    """All videos of the `video` input with the server's defaults (the `text_input` path)."""
    source = _VideoSource(video_elements, limits, timeout_s)
    return [
        source.next(source.options({}, f"video[{index}]"), f"video[{index}]")
        for index in range(len(video_elements))
    ]
