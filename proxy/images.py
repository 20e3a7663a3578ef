"""Image parts' URLs -> encoded image bytes: inline `data:` URLs decoded here, http(s) URLs
handed to the guarded fetcher (proxy/fetch.py), all in the order the parts appear."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .error_catalogue import IMAGE_URL_FORBIDDEN, INVALID_IMAGE, INVALID_IMAGE_URL, APIError

# Clients often write image/jpg; the bytes are checked against known signatures anyway.
_DATA_URL = re.compile(
    r"data:(?P<media_type>image/(?:jpeg|jpg|png|webp|gif))"
    r"(?P<params>(?:;[^;,]*)*?);base64,(?P<payload>.*)",
    re.IGNORECASE | re.DOTALL,
)
_WHITESPACE = re.compile(rb"\s+")
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImageRef:
    """One image part's URL and its position in the request (the `param` of its errors)."""

    url: str
    param: str

    @property
    def is_remote(self) -> bool:
        return url_scheme(self.url) in REMOTE_SCHEMES


class ImageFetcher(Protocol):
    async def fetch_all(self, refs: Sequence[ImageRef]) -> list[bytes]:
        """The images of `refs` (all remote), fetched concurrently, in order."""
        ...


async def load_images(refs: Sequence[ImageRef], fetcher: ImageFetcher | None) -> list[bytes]:
    """The encoded images `refs` point to, in order.

    Inline images are checked first, so a request with a broken data: URL fails before any
    network I/O; `fetcher` None means remote fetching is disabled on this server.
    """
    images: list[bytes | None] = [
        None if ref.is_remote else load_inline_image(ref.url, ref.param) for ref in refs
    ]
    remote = [i for i, ref in enumerate(refs) if ref.is_remote]
    if remote and fetcher is None:
        raise IMAGE_URL_FORBIDDEN(
            refs[remote[0]].param,
            message="Fetching image URLs is disabled on this server; send the image inline as "
            "a base64 data: URL.",
        )
    if remote:
        assert fetcher is not None
        fetched = await fetcher.fetch_all([refs[i] for i in remote])
        for index, image in zip(remote, fetched, strict=True):
            images[index] = image
    return [image for image in images if image is not None]


def url_scheme(url: str) -> str | None:
    match = _SCHEME.match(url.strip())
    return match["scheme"].lower() if match else None


def load_inline_image(url: str, param: str) -> bytes:
    """The bytes of a non-remote image URL: only `data:image/...;base64,` is accepted."""
    scheme = url_scheme(url)
    if scheme is None:
        raise INVALID_IMAGE_URL(
            param,
            message="Unsupported image URL: expected an http(s) URL or a data:image/...;base64 "
            "URL.",
        )
    if scheme != "data":
        # file:, ftp:, gopher:, ... would make the proxy read local files or speak other
        # protocols on the client's behalf.
        raise IMAGE_URL_FORBIDDEN(
            param, message="Image URLs must use http, https or data; this scheme is not allowed."
        )
    return decode_data_url(url, param)


def decode_data_url(url: str, param: str) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise INVALID_IMAGE(
            param,
            message="Invalid image data URL: expected data:image/(jpeg|png|webp|gif);base64,"
            "<data>.",
        )
    payload = _WHITESPACE.sub(b"", match["payload"].encode("ascii", "replace"))
    try:
        image = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise INVALID_IMAGE(param, message="Invalid base64 image data.") from None
    if not is_known_image(image):
        raise not_an_image(param)
    return image


def not_an_image(param: str) -> APIError:
    return INVALID_IMAGE(param, message="The image data is not a JPEG, PNG, WebP or GIF image.")


def is_known_image(data: bytes) -> bool:
    """Sniffed from magic bytes; declared media types are not trusted."""
    return (
        data.startswith(b"\xff\xd8\xff")  # JPEG
        or data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith((b"GIF87a", b"GIF89a"))
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )
