"""The image media kind: what images are (magic bytes, data: URL types) and their checks
from the header, before the model decodes them.

Pillow's `Image.open` reads only the header: format, width and height, no pixel. From it the
proxy refuses decompression bombs, images over the source-pixel limit, too small or too
elongated, and requests whose images hold too many pixels in all (the model decodes every
image at full size before resizing).
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from ..error_catalogue import (
    IMAGE_ASPECT_RATIO_TOO_LARGE,
    IMAGE_FETCH_FAILED,
    IMAGE_FETCH_TIMEOUT,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    IMAGE_URL_FORBIDDEN,
    INVALID_IMAGE,
    INVALID_IMAGE_URL,
    TOO_MANY_IMAGES,
    TOO_MANY_PIXELS,
    APIError,
)
from ..transport.contract import SNIFF_BYTES, Input, sniff_image
from .kinds import MediaKind, MediaRef
from .pixels import part_budget

if TYPE_CHECKING:
    from ..request.limits import RequestLimits

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
