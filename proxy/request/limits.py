"""Per-request limits, checked before the work they bound.

A public multimodal endpoint receives huge base64 bodies, decompression-bomb images, 1x1 and
1x10000 images and requests with thousands of parts. Each limit below is a flag
(proxy/config.py) and is checked as early as the information exists:

    body bytes          Content-Length before reading (proxy/serving/admission.py), then while
                        reading (aiohttp's client_max_size, which also bounds chunked and
                        compressed bodies)                                       413
    lone surrogates     after JSON parsing: they cannot become UTF-8 for the model  400
    messages, text characters, images, image bytes (data: URLs, estimated from the base64
                        length before decoding)                                  400
    image bytes, pixels, smallest side, aspect ratio, pixels per request: from the decoded
                        bytes and the image *header* (proxy/media/images.py: Pillow's `Image.open`
                        reads the header; no pixel is decoded here, the model decodes)  400

Limits the model has too (`max_images`, `max_source_pixels`, the aspect ratio) are the
model's own unless a flag narrows them (proxy/transport/model_limits.py), so the proxy answers first
and the model's own checks stay a second line. Media parts are counted and sized by kind
(proxy/media/kinds.py); each kind checks its own bytes (`MediaKind.inspect`).
Every refusal is an error of proxy/error_catalogue.py with the offending `param`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..error_catalogue import INVALID_UNICODE, TEXT_TOO_LONG, TOO_MANY_MESSAGES
from ..errors import SURROGATE
from ..media.kinds import MediaKind, MediaRef, url_scheme
from ..transport.contract import ModelLimits
from ..transport.model_limits import narrower
from .schema import ChatCompletionRequest, MediaPart, TextPart

MIB = 1024 * 1024
_DATA_URL_PAYLOAD = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)

# Cheap pre-test on the raw body: lone surrogates can only come from \uD800-\uDFFF escapes
# or from CESU-style bytes (json.loads decodes bytes with surrogatepass).
_RAW_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")


@dataclass(frozen=True)
class RequestLimits:
    """Ceilings on one chat request; each field is the flag `--<field>` (proxy/config.py)."""

    max_messages: int = 512
    # Prompts of one /v1/completions request: each is a generation of its own, all at once.
    max_prompts: int = 16
    max_text_chars: int = 1_000_000
    # 0: the model's own limit (what it answers to `describe`); a value may only narrow it.
    max_images: int = 0
    max_image_bytes: int = 20 * MIB
    max_image_source_pixels: int = 0  # 0: the model's
    min_image_side: int = 1
    max_image_aspect_ratio: float = 0  # 0: the model's
    max_request_pixels: int = 200_000_000
    max_videos: int = 0  # 0: the model's max_videos
    max_video_bytes: int = 64 * MIB
    # What a request may ask the model's grammar compiler for (proxy/request/structured.py);
    # 0: the model's max_tools, max_schema_bytes, max_schema_depth.
    max_tools: int = 0
    max_schema_bytes: int = 0
    max_schema_depth: int = 0

    def within(self, model: ModelLimits) -> RequestLimits:
        """These limits with the model's in place of 0 and over any laxer flag."""
        return dataclasses.replace(
            self,
            max_images=int(narrower(self.max_images, model.max_images)),
            max_image_source_pixels=int(
                narrower(self.max_image_source_pixels, model.max_source_pixels)
            ),
            max_image_aspect_ratio=narrower(self.max_image_aspect_ratio, model.max_aspect_ratio),
            max_videos=int(narrower(self.max_videos, model.max_videos)),
            max_tools=int(narrower(self.max_tools, model.max_tools)),
            max_schema_bytes=int(narrower(self.max_schema_bytes, model.max_schema_bytes)),
            max_schema_depth=int(narrower(self.max_schema_depth, model.max_schema_depth)),
        )


# ---- the request, before any image is decoded ------------------------------------------


def check_json_text(raw: bytes, body: Any) -> None:
    """Refuses strings with unpaired surrogates (`"\\ud800"`): valid JSON, but no UTF-8
    encoding exists for them, so they would fail deep in the Triton client or the model."""
    if not _RAW_SURROGATE.search(raw):
        return
    for path, text in _strings(body, "body"):
        if SURROGATE.search(text):
            raise INVALID_UNICODE(None if path == "body" else path.removeprefix("body."))


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    # Iterative: the JSON parser already bounded the depth, but recursion here need not.
    stack = [(node, path)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, dict):
            for key, value in node.items():
                yield path, key
                stack.append((value, f"{path}.{key}"))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))


def check_chat(chat: ChatCompletionRequest, limits: RequestLimits) -> None:
    """Counts messages, text and media parts, and sizes inline media from their base64
    length, before anything is decoded or fetched."""
    if len(chat.messages) > limits.max_messages:
        raise TOO_MANY_MESSAGES(
            chat.paths("messages"), count=len(chat.messages), limit=limits.max_messages
        )
    prompt = chat.prompt
    if prompt is not None and prompt.text is not None and len(prompt.text) > limits.max_text_chars:
        message = f"The prompt holds more than {limits.max_text_chars} characters; shorten it."
        raise TEXT_TOO_LONG.with_message(message, prompt.param)
    text_chars = 0
    counts: dict[str, int] = {}
    for i, message in enumerate(chat.messages):
        content = message.content
        parts = [content] if isinstance(content, str) else content or []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(content, str) else f"[{j}]")
            if isinstance(part, str | TextPart):
                text_chars += len(part if isinstance(part, str) else part.text)
                if text_chars > limits.max_text_chars:
                    raise TEXT_TOO_LONG(chat.paths(where), limit=limits.max_text_chars)
            elif isinstance(part, MediaPart):
                kind = part.kind
                param = chat.paths(f"{where}.{kind.part_type}")
                counts[kind.name] = count = counts.get(kind.name, 0) + 1
                limit = kind.max_parts(limits)
                if count > limit:
                    raise kind.too_many(param, limit=limit)
                _check_inline_size(part.source.url, param, kind, kind.max_bytes(limits))


def _check_inline_size(url: str, param: str, kind: MediaKind, max_bytes: int) -> None:
    if url_scheme(url) != "data":
        return
    match = _DATA_URL_PAYLOAD.match(url)
    if match is None:
        return  # proxy/media/kinds.py explains what is wrong with it
    # 3 bytes per 4 base64 characters. Whitespace inside the payload (MIME line breaks: under
    # 2%) makes this an overestimate, hence the 1/16 margin; media near the limit are
    # measured exactly once decoded.
    estimated = (len(url) - match.end()) * 3 // 4
    if estimated > max_bytes + max_bytes // 16 + 3:
        raise kind.too_many_bytes(param, max_bytes)


async def check_media(
    media: Sequence[bytes], refs: Sequence[MediaRef], limits: RequestLimits
) -> None:
    """The encoded `media` (in the order of `refs`), kind by kind, before the model decodes
    anything: each part's bytes against its kind's limit, then the kind's own checks
    (proxy/media/images.py for images), if it has any."""
    kinds = dict.fromkeys(ref.kind for ref in refs)
    for kind in kinds:
        mine = [i for i, ref in enumerate(refs) if ref.kind is kind]
        max_bytes = kind.max_bytes(limits)
        for i in mine:
            if len(media[i]) > max_bytes:
                raise kind.too_many_bytes(refs[i].param, max_bytes)
        if kind.inspect is not None:
            await kind.inspect([media[i] for i in mine], [refs[i] for i in mine], limits)
