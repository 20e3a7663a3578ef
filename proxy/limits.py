"""Per-request limits, checked before the work they bound.

A public multimodal endpoint receives huge base64 bodies, decompression-bomb images, 1x1 and
1x10000 images and requests with thousands of parts. Each limit below is a flag
(proxy/config.py) and is checked as early as the information exists:

    body bytes          Content-Length before reading (proxy/admission.py), then while
                        reading (aiohttp's client_max_size, which also bounds chunked and
                        compressed bodies)                                       413
    lone surrogates     after JSON parsing: they cannot become UTF-8 for the model  400
    messages, text characters, images, image bytes (data: URLs, estimated from the base64
                        length before decoding)                                  400
    image bytes, pixels, smallest side, aspect ratio, pixels per request: from the decoded
                        bytes and the image *header* (Pillow's `Image.open` reads the header;
                        no pixel is decoded here, the model decodes)              400

Defaults are those of the model (`max_images` 16, `max_source_pixels` 40 MP, aspect 200:1)
or stricter, so the proxy answers first and the model's own checks stay a second line.
Every refusal is an error of proxy/error_catalogue.py with the offending `param`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .error_catalogue import (
    IMAGE_ASPECT_RATIO_TOO_LARGE,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    INVALID_IMAGE,
    INVALID_UNICODE,
    TEXT_TOO_LONG,
    TOO_MANY_IMAGES,
    TOO_MANY_MESSAGES,
    TOO_MANY_PIXELS,
    APIError,
)
from .errors import SURROGATE
from .images import ImageRef, is_known_image, url_scheme
from .model_contract import ModelLimits
from .model_limits import narrower
from .schema import ChatCompletionRequest, ImagePart, TextPart

MIB = 1024 * 1024

# A decompression bomb is an error in this process, never a warning (the proxy only reads
# headers; nothing else here opens images).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Pillow's header parsers walk markers and chunks in Python: a hostile 20 MiB image made of
# tiny JPEG markers or PNG chunks takes seconds. That runs on these threads, never on the
# event loop; few of them, so such images queue behind each other instead of multiplying.
_HEADER_THREADS = 4
_header_executor: ThreadPoolExecutor | None = None

# Only the plugins of the formats the model accepts parse anything.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
_DATA_URL_PAYLOAD = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)
# Cheap pre-test on the raw body: lone surrogates can only come from \uD800-\uDFFF escapes
# or from CESU-style bytes (json.loads decodes bytes with surrogatepass).
_RAW_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")


@dataclass(frozen=True)
class RequestLimits:
    """Ceilings on one chat request; each field is the flag `--<field>` (proxy/config.py)."""

    max_messages: int = 512
    max_text_chars: int = 1_000_000
    # 0: the model's own limit (what it answers to `describe`); a value may only narrow it.
    max_images: int = 0
    max_image_bytes: int = 20 * MIB
    max_image_source_pixels: int = 0  # 0: the model's
    min_image_side: int = 1
    max_image_aspect_ratio: float = 0  # 0: the model's
    max_request_pixels: int = 200_000_000

    def within(self, model: ModelLimits) -> RequestLimits:
        """These limits with the model's in place of 0 and over any laxer flag."""
        return dataclasses.replace(
            self,
            max_images=int(narrower(self.max_images, model.max_images)),
            max_image_source_pixels=int(
                narrower(self.max_image_source_pixels, model.max_source_pixels)
            ),
            max_image_aspect_ratio=narrower(self.max_image_aspect_ratio, model.max_aspect_ratio),
        )


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# ---- errors ----------------------------------------------------------------------------


def invalid_image(param: str) -> APIError:
    return INVALID_IMAGE(
        param,
        message="The image could not be read: it is not a complete JPEG, PNG, WebP or GIF image.",
    )


def image_too_large_bytes(param: str, max_bytes: int) -> APIError:
    return IMAGE_TOO_LARGE(
        param, message=f"The image is larger than this server's limit of {max_bytes} bytes."
    )


def _too_many_pixels(param: str, limits: RequestLimits, size: str = "") -> APIError:
    return IMAGE_TOO_LARGE(
        param,
        message=f"The image is too large{size}: this server accepts at most "
        f"{limits.max_image_source_pixels} pixels per image.",
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
    """Counts messages, text and images, and sizes inline images from their base64 length,
    before anything is decoded or fetched."""
    if len(chat.messages) > limits.max_messages:
        raise TOO_MANY_MESSAGES("messages", count=len(chat.messages), limit=limits.max_messages)
    text_chars = 0
    images = 0
    for i, message in enumerate(chat.messages):
        content = message.content
        parts = [content] if isinstance(content, str) else content or []
        for j, part in enumerate(parts):
            param = f"messages[{i}].content" + ("" if isinstance(content, str) else f"[{j}]")
            if isinstance(part, str | TextPart):
                text_chars += len(part if isinstance(part, str) else part.text)
                if text_chars > limits.max_text_chars:
                    raise TEXT_TOO_LONG(param, limit=limits.max_text_chars)
            elif isinstance(part, ImagePart):
                images += 1
                param += ".image_url"
                if images > limits.max_images:
                    raise TOO_MANY_IMAGES(param, limit=limits.max_images)
                _check_inline_size(part.image_url.url, param, limits)


def _check_inline_size(url: str, param: str, limits: RequestLimits) -> None:
    if url_scheme(url) != "data":
        return
    match = _DATA_URL_PAYLOAD.match(url)
    if match is None:
        return  # proxy/images.py explains what is wrong with it
    # 3 bytes per 4 base64 characters. Whitespace inside the payload (MIME line breaks: under
    # 2%) makes this an overestimate, hence the 1/16 margin; images near the limit are
    # measured exactly once decoded.
    estimated = (len(url) - match.end()) * 3 // 4
    if estimated > limits.max_image_bytes + limits.max_image_bytes // 16 + 3:
        raise image_too_large_bytes(param, limits.max_image_bytes)


# ---- the images, from their headers ----------------------------------------------------


def read_image_header(data: bytes) -> ImageHeader | None:
    """Format and size from the image header, without decoding pixels; None when it is not
    a JPEG, PNG, GIF or WebP. Raises what Pillow raises for unreadable headers, and
    `Image.DecompressionBombError` or `DecompressionBombWarning` for bombs."""
    if not is_known_image(data):
        return None
    with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
        return ImageHeader(image.format.lower(), *image.size)


def _safe_header(data: bytes) -> ImageHeader | str:
    """The header, or why it cannot be used ("bomb", "invalid"); runs on a header thread."""
    try:
        header = read_image_header(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "bomb"
    except Exception:  # Pillow raises many types for hostile headers; none is for clients
        return "invalid"
    return header if header is not None else "invalid"


async def read_headers(images: Sequence[bytes]) -> list[ImageHeader | str]:
    global _header_executor
    if _header_executor is None:
        _header_executor = ThreadPoolExecutor(_HEADER_THREADS, thread_name_prefix="image-header")
    loop = asyncio.get_running_loop()
    return list(
        await asyncio.gather(
            *(loop.run_in_executor(_header_executor, _safe_header, data) for data in images)
        )
    )


async def check_images(
    images: Sequence[bytes], refs: Sequence[ImageRef], limits: RequestLimits
) -> None:
    """Bytes, pixels, smallest side, aspect ratio and the request's total pixels of the
    encoded `images` (in the order of `refs`), from their headers."""
    if not images:
        return
    for data, ref in zip(images, refs, strict=True):
        if len(data) > limits.max_image_bytes:
            raise image_too_large_bytes(ref.param, limits.max_image_bytes)
    total = 0
    for header, ref in zip(await read_headers(images), refs, strict=True):
        check_image_header(header, ref.param, limits)
        assert isinstance(header, ImageHeader)
        total += header.pixels
        if total > limits.max_request_pixels:
            raise TOO_MANY_PIXELS(ref.param, limit=limits.max_request_pixels)


def check_image_header(header: ImageHeader | str, param: str, limits: RequestLimits) -> None:
    if header == "bomb":
        raise _too_many_pixels(param, limits)
    if not isinstance(header, ImageHeader):
        raise invalid_image(param)
    width, height = header.width, header.height
    if width < 1 or height < 1:
        raise invalid_image(param)
    if header.pixels > limits.max_image_source_pixels:
        raise _too_many_pixels(param, limits, f" ({width}x{height})")
    if min(width, height) < limits.min_image_side:
        raise IMAGE_TOO_SMALL(param, width=width, height=height, min_side=limits.min_image_side)
    if max(width, height) / min(width, height) > limits.max_image_aspect_ratio:
        raise IMAGE_ASPECT_RATIO_TOO_LARGE(
            param, width=width, height=height, limit=limits.max_image_aspect_ratio
        )
