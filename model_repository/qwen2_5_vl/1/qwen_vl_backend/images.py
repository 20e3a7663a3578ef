"""Image elements of the `image` input → RGB PIL images.

An element may be raw encoded bytes, base64 of them, or a `data:` URL. The model never
fetches URLs: network I/O belongs to the caller (the proxy), which hands over bytes.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from .errors import RequestError

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format from magic bytes; headers and file names are not trusted."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


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
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise RequestError("image data URL must look like data:image/<type>;base64,<data>", param)
    return _b64decode(payload, param)


def element_bytes(element: bytes, param: str) -> bytes:
    """Encoded image bytes from one `image` tensor element, whatever its wrapping."""
    if element[:5].lower() == b"data:":
        return data_url_bytes(element, param)
    if sniff_format(element):
        return element
    return _b64decode(element, param)


def decode_image(data: bytes, param: str) -> Image.Image:
    """Decode and fully load an image; bad or hostile input becomes a RequestError."""
    if sniff_format(data) is None:
        raise RequestError("image is not a JPEG, PNG, WebP or GIF file", param)
    try:
        with warnings.catch_warnings():
            # A decompression bomb must fail, not merely warn.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise RequestError("image could not be decoded", param) from exc
