"""Image elements of the `image` input → RGB PIL images, decoded in the decode sandbox.

An element may be raw encoded bytes, base64 of them, or a `data:` URL. The model never
fetches URLs: network I/O belongs to the caller (the proxy), which hands over bytes.
"""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from ..contract import ModelLimits, sniff_image, split_data_url
from ..engine.timings import counts_as_media_decode
from ..errors import RequestError
from . import decoding


def _b64decode(text: bytes | str, param: str) -> bytes:
    try:
        cleaned = b"".join(text.split()) if isinstance(text, bytes) else "".join(text.split())
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("image is not valid base64", param) from exc


def data_url_bytes(url: str | bytes, param: str) -> bytes:
    """The payload of a base64 `data:image/...;base64,...` URL."""
    if isinstance(url, bytes):
        url = url.decode("ascii", errors="replace")
    media_type, payload = split_data_url(url) or ("", "")
    if not media_type.startswith("image/"):
        raise RequestError("image data URL must look like data:image/<type>;base64,<data>", param)
    return _b64decode(payload, param)


def element_bytes(element: bytes, param: str) -> bytes:
    """Encoded image bytes from one `image` tensor element, whatever its wrapping."""
    if element[:5].lower() == b"data:":
        return data_url_bytes(element, param)
    if sniff_image(element):
        return element
    return _b64decode(element, param)


DEFAULT_LIMITS = ModelLimits()
# A still image's decode deadline in its worker (a 40-megapixel PNG takes about a second).
IMAGE_DECODE_TIMEOUT_S = 20.0


@counts_as_media_decode
def decode_image(
    data: bytes,
    param: str,
    limits: ModelLimits = DEFAULT_LIMITS,
    budget: dict | None = None,
) -> Image.Image:
    """Decode an image to RGB in the decode sandbox, checked from its header first and, with a
    `budget` (min_pixels, max_pixels), resized onto the 28-pixel grid there as qwen-vl-utils'
    fetch_image would; bad or hostile input becomes a RequestError."""
    if sniff_image(data) is None:
        raise RequestError("image is not a JPEG, PNG, WebP or GIF file", param, "invalid_image")
    args = {
        "max_source_pixels": limits.max_source_pixels,
        "max_aspect_ratio": limits.max_aspect_ratio,
    }
    if budget and "max_pixels" in budget:
        args |= {"min_pixels": budget.get("min_pixels", limits.min_pixels)}
        args |= {"max_pixels": budget["max_pixels"]}
    pixels, _ = decoding.run("image", data, args, IMAGE_DECODE_TIMEOUT_S, param, "image")
    return Image.fromarray(pixels)
