"""Image elements of the `image` input → RGB PIL images.

An element may be raw encoded bytes, base64 of them, or a `data:` URL. The model never
fetches URLs: network I/O belongs to the caller (the proxy), which hands over bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

from ..contract import ModelLimits, sniff_image, split_data_url
from ..engine.timings import counts_as_media_decode
from ..errors import RequestError


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


@counts_as_media_decode
def decode_image(data: bytes, param: str, limits: ModelLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode and fully load an image as RGB; bad or hostile input becomes a RequestError."""
    if sniff_image(data) is None:
        raise RequestError("image is not a JPEG, PNG, WebP or GIF file", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            # A decompression bomb must fail, not merely warn.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, param, limits)  # from the header, before decoding pixels
            image.load()
            return _to_rgb(image)
    except RequestError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise RequestError("image is too large to decode", param, "image_too_large") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError("image could not be decoded", param, "invalid_image") from exc


def _check_size(size: tuple[int, int], param: str, limits: ModelLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise RequestError("image has no pixels", param, "invalid_image")
    if width * height > limits.max_source_pixels:
        raise RequestError(
            f"image is {width}x{height} pixels; at most {limits.max_source_pixels} "
            "pixels are accepted",
            param,
            "image_too_large",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise RequestError(
            f"image is {width}x{height}; its aspect ratio must be at most "
            f"{limits.max_aspect_ratio:g}:1",
            param,
            "invalid_image",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB as a viewer would show it: 16-bit scaled down, transparency over white."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
