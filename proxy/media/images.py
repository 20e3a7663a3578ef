"""The image media kind: what images are (magic bytes, data: URL types) and their checks
from the header, before the model decodes them.

Pillow's `Image.open` reads only the header: format, width and height, no pixel. It runs in
the decode sandbox (decoding.py), never in this process: Pillow's header parsers are image
parsers all the same (WebP's calls libwebp). From the header the proxy refuses decompression
bombs, images over the source-pixel limit, too small or too elongated, and requests whose
images hold too many pixels in all (the model decodes every image at full size before
resizing). In this process only the contract's magic-byte sniffer looks at image bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..error_catalogue import (
    IMAGE_ASPECT_RATIO_TOO_LARGE,
    IMAGE_FETCH_FAILED,
    IMAGE_FETCH_TIMEOUT,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    IMAGE_URL_FORBIDDEN,
    INVALID_IMAGE,
    INVALID_IMAGE_URL,
    SERVER_BUSY,
    TOO_MANY_IMAGES,
    TOO_MANY_PIXELS,
    APIError,
)
from ..transport.contract import SNIFF_BYTES, Input, sniff_image
from . import decoding
from .kinds import MediaKind, MediaRef
from .pixels import part_budget
from .sandbox import DecodeFailed, Refused, SandboxBusy

if TYPE_CHECKING:
    from ..request.limits import RequestLimits

# Pillow's header parsers walk markers and chunks in Python: a hostile 20 MiB image made of
# tiny JPEG markers or PNG chunks takes seconds. These threads wait on the decode workers,
# never the event loop; as many as there are workers, so such images queue for a worker.
_header_executor: ThreadPoolExecutor | None = None


def is_known_image(data: bytes) -> bool:
    """Sniffed from magic bytes (the contract's sniffer); declared types are not trusted."""
    return sniff_image(data) is not None


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


def _too_many_pixels(param: str, limits: RequestLimits, size: str = "") -> APIError:
    return IMAGE_TOO_LARGE(
        param,
        message=f"The image is too large{size}: this server accepts at most "
        f"{limits.max_image_source_pixels} pixels per image.",
    )


# ---- the images, from their headers ----------------------------------------------------


def read_image_header(data: bytes) -> ImageHeader | None:
    """Format and size from the image header (read in a decode worker, no pixel decoded);
    None when it is not a JPEG, PNG, GIF or WebP. Raises the sandbox's `Refused` (a bomb, an
    unreadable header), `DecodeFailed` (the worker died or hung) or `SandboxBusy`."""
    if not is_known_image(data):
        return None
    _, (kind, width, height) = decoding.pool().run("image_header", data, {}, decoding.timeout_s())
    return ImageHeader(str(kind), int(width), int(height))


def _safe_header(data: bytes) -> ImageHeader | str:
    """The header, or why it cannot be used ("bomb", "invalid", "busy"); runs on a header
    thread."""
    try:
        header = read_image_header(data)
    except Refused as refused:
        return "bomb" if refused.code == "image_too_large" else "invalid"
    except DecodeFailed:
        return "invalid"
    except SandboxBusy:
        return "busy"
    except (TypeError, ValueError):  # metadata not of the header's shape: the worker lied
        return "invalid"
    return header if header is not None else "invalid"


async def read_headers(images: Sequence[bytes]) -> list[ImageHeader | str]:
    global _header_executor
    if _header_executor is None:
        threads = max(4, decoding.pool().config.workers)
        _header_executor = ThreadPoolExecutor(threads, thread_name_prefix="image-header")
    loop = asyncio.get_running_loop()
    return list(
        await asyncio.gather(
            *(loop.run_in_executor(_header_executor, _safe_header, data) for data in images)
        )
    )


async def check_images(
    images: Sequence[bytes], refs: Sequence[MediaRef], limits: RequestLimits
) -> None:
    """Pixels, smallest side, aspect ratio and the request's total pixels of the encoded
    `images` (in the order of `refs`), from their headers; their bytes are checked before
    (limits.check_media)."""
    if not images:
        return
    total = 0
    for header, ref in zip(await read_headers(images), refs, strict=True):
        check_image_header(header, ref.param, limits)
        assert isinstance(header, ImageHeader)
        total += header.pixels
        if total > limits.max_request_pixels:
            raise TOO_MANY_PIXELS(ref.param, limit=limits.max_request_pixels)


def check_image_header(header: ImageHeader | str, param: str, limits: RequestLimits) -> None:
    if header == "busy":
        raise SERVER_BUSY()
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


IMAGE = MediaKind(
    part_type="image_url",
    name="image",
    tensor=Input.IMAGE,
    # Clients often write image/jpg; the bytes are checked against known signatures anyway.
    media_types=frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif"}),
    frame_types=frozenset(),
    data_url_form="data:image/(jpeg|png|webp|gif);base64,<data>",
    formats="JPEG, PNG, WebP or GIF",
    recognise=is_known_image,
    sniff_bytes=SNIFF_BYTES,
    max_parts=lambda limits: limits.max_images,
    max_bytes=lambda limits: limits.max_image_bytes,
    fetch_max_bytes=lambda policy: policy.max_bytes,
    fetch_timeout_s=lambda policy: policy.timeout_s,
    budget=part_budget,
    inspect=check_images,
    too_many=TOO_MANY_IMAGES,
    invalid=INVALID_IMAGE,
    bad_url=INVALID_IMAGE_URL,
    forbidden_url=IMAGE_URL_FORBIDDEN,
    too_large=IMAGE_TOO_LARGE,
    fetch_failed=IMAGE_FETCH_FAILED,
    fetch_timeout=IMAGE_FETCH_TIMEOUT,
)
