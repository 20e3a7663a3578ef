"""Media parts of a request (images, videos), from the schema to the Triton request, whatever
their kind.

A `MediaKind` holds everything kind-specific: the OpenAI content-part type (which is also the
name of the part's URL object, `image_url`), the word the model's chat parts use (`image`),
the Triton input its bytes travel in, the media types a `data:` URL may declare, how its
bytes are recognised (magic bytes: declared types are not trusted) and which limits count,
size and time it: typed accessors of `RequestLimits` and `FetchPolicy` (`lambda limits:
limits.max_images`), not field names as strings, so a type checker sees a renamed limit. A
`MediaRef` is one part of one request: its kind, URL, the client's path to it (the `param`
of its errors) and the resize budget the model gets with it.

Every layer works on `MediaRef`s: proxy/request/translate.py makes them, this module loads their
bytes (inline `data:` URLs here, http(s) URLs through the guarded fetcher of proxy/media/fetch.py),
proxy/request/limits.py checks them, proxy/transport/backend.py sends each kind's bytes in its
own input. A new kind is a `MediaKind` with its checks (as proxy/media/videos.py) and its
content part in proxy/request/schema.py.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..error_catalogue import APIError, ErrorEntry
from ..transport.contract import FRAME_FORMATS, sniff_image, split_data_url

if TYPE_CHECKING:
    from ..request.limits import RequestLimits
    from ..request.translate import ServerLimits
    from .fetch import FetchPolicy

_WHITESPACE = re.compile(rb"\s+")
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class MediaKind:
    part_type: str  # the OpenAI content part, and its URL object's name: "image_url"
    name: str  # what the model's chat parts call it: {"type": "image", ...}
    tensor: str  # the Triton input that carries the encoded bytes
    media_types: frozenset[str]  # accepted in data: URLs (lower case)
    # data: URL types whose payload is a comma-separated list of base64 images (video frames
    # the client sampled); sent on as the data: URL text, each frame checked here
    frame_types: frozenset[str]
    data_url_form: str  # for error messages: "data:image/(jpeg|png|webp|gif);base64,<data>"
    formats: str  # for error messages: "JPEG, PNG, WebP or GIF"
    recognise: Callable[[bytes], bool]  # from the first bytes (at most `sniff_bytes`)
    sniff_bytes: int
    max_parts: Callable[[RequestLimits], int]  # parts of this kind per request
    max_bytes: Callable[[RequestLimits], int]  # one part's encoded bytes
    fetch_max_bytes: Callable[[FetchPolicy], int]  # one remote part: bytes, then seconds
    fetch_timeout_s: Callable[[FetchPolicy], float]
    # (the part's URL object, the translation's limits, the request's (min, max) pixels,
    # param) -> the chat-part keys the model resizes and samples by
    budget: Callable[[Any, ServerLimits, tuple[int | None, int | None], str], dict[str, Any]]
    # (encoded bytes, their refs, limits): the kind's own checks before the model decodes,
    # after limits.check_media has checked every part's bytes; None: bytes only
    inspect: Callable[[Sequence[bytes], Sequence[MediaRef], RequestLimits], Awaitable[None]] | None
    # the kind's errors (proxy/error_catalogue.py)
    too_many: ErrorEntry
    invalid: ErrorEntry
    bad_url: ErrorEntry
    forbidden_url: ErrorEntry
    too_large: ErrorEntry
    fetch_failed: ErrorEntry
    fetch_timeout: ErrorEntry

    def not_this_kind(self, param: str) -> APIError:
        return self.invalid(
            param, message=f"The {self.name} data is not a {self.formats} {self.name}."
        )

    def too_many_bytes(self, param: str, limit: int) -> APIError:
        return self.too_large(
            param, message=f"The {self.name} is larger than this server's limit of {limit} bytes."
        )


@dataclass(frozen=True)
class MediaRef:
    """One media part: its kind, URL, the client's path to it and the model's budget for it
    (the extra keys of its chat part, e.g. min_pixels/max_pixels)."""

    kind: MediaKind
    url: str
    param: str
    budget: tuple[tuple[str, Any], ...] = ()

    @property
    def is_remote(self) -> bool:
        return url_scheme(self.url) in REMOTE_SCHEMES

    def chat_part(self) -> dict[str, Any]:
        """The part the model's chat template gets; its bytes are the next element of the
        kind's input, in order of appearance across all turns."""
        return {"type": self.kind.name, **dict(self.budget)}


class MediaFetcher(Protocol):
    async def fetch_all(self, refs: Sequence[MediaRef]) -> list[bytes]:
        """The media of `refs` (all remote), fetched concurrently, in order."""
        ...


async def load_media(refs: Sequence[MediaRef], fetcher: MediaFetcher | None) -> list[bytes]:
    """The encoded bytes `refs` point to, in order.

    Inline parts are decoded first, so a request with a broken data: URL fails before any
    network I/O; `fetcher` None means remote fetching is disabled on this server.
    """
    loaded: list[bytes | None] = [None if ref.is_remote else load_inline(ref) for ref in refs]
    remote = [i for i, ref in enumerate(refs) if ref.is_remote]
    if remote and fetcher is None:
        ref = refs[remote[0]]
        raise ref.kind.forbidden_url(
            ref.param,
            message=f"Fetching {ref.kind.name} URLs is disabled on this server; send the "
            f"{ref.kind.name} inline as a base64 data: URL.",
        )
    if remote:
        assert fetcher is not None
        fetched = await fetcher.fetch_all([refs[i] for i in remote])
        for index, data in zip(remote, fetched, strict=True):
            loaded[index] = data
    return [data for data in loaded if data is not None]


def url_scheme(url: str) -> str | None:
    match = _SCHEME.match(url.strip())
    return match["scheme"].lower() if match else None


def load_inline(ref: MediaRef) -> bytes:
    """The bytes of a non-remote URL: only a base64 `data:` URL of the kind is accepted."""
    kind, scheme = ref.kind, url_scheme(ref.url)
    if scheme is None:
        raise kind.bad_url(
            ref.param,
            message=f"Unsupported {kind.name} URL: expected an http(s) URL or a "
            f"data:{kind.name}/...;base64 URL.",
        )
    if scheme != "data":
        # file:, ftp:, gopher:, ... would make the proxy read local files or speak other
        # protocols on the client's behalf.
        raise kind.forbidden_url(
            ref.param,
            message=f"{kind.name.capitalize()} URLs must use http, https or data; this scheme "
            "is not allowed.",
        )
    return decode_data_url(ref)


def decode_data_url(ref: MediaRef) -> bytes:
    kind = ref.kind
    media_type, payload_text = split_data_url(ref.url) or ("", "")
    if media_type in kind.frame_types:
        return _frame_list(ref, payload_text)
    if media_type not in kind.media_types:
        raise kind.invalid(
            ref.param, message=f"Invalid {kind.name} data URL: expected {kind.data_url_form}."
        )
    payload = _WHITESPACE.sub(b"", payload_text.encode("ascii", "replace"))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise kind.invalid(ref.param, message=f"Invalid base64 {kind.name} data.") from None
    if not kind.recognise(data):
        raise kind.not_this_kind(ref.param)
    return data


def _frame_list(ref: MediaRef, payload: str) -> bytes:
    """A client's frame list (`data:video/jpeg;base64,<frame>,<frame>,...`): every frame must be
    base64 of a known image; the data: URL goes on as it is (the model reads it)."""
    frames = [frame for frame in payload.split(",") if frame.strip()]
    if not frames:
        raise ref.kind.invalid(ref.param, message=f"The {ref.kind.name} frame list is empty.")
    for index, frame in enumerate(frames):
        try:
            data = base64.b64decode(
                _WHITESPACE.sub(b"", frame.encode("ascii", "replace")), validate=True
            )
        except (binascii.Error, ValueError):
            data = b""
        if not is_frame(data):
            raise ref.kind.invalid(
                ref.param,
                message=f"Frame {index} of the {ref.kind.name} frame list is not base64 of a "
                "JPEG, PNG or WebP image.",
            )
    return ref.url.encode("ascii", "replace")


def is_frame(data: bytes) -> bool:
    return sniff_image(data) in FRAME_FORMATS
