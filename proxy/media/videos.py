"""The video media kind: `video_url` parts as MP4/WebM/MOV/MKV containers (inline or fetched)
or as frame lists the client sampled (`data:video/jpeg;base64,<frame>,<frame>,...`).

The proxy counts and sizes videos and checks what a container's first bytes say; the model
reads the container header (duration, frames, resolution) and refuses before decoding
(qwen_vl_backend/media/videos.py), so this side needs no video decoder. Each video part gets its
sampling budget here, within the model's limits: `fps`, `max_frames`, per-frame `min_pixels`
/ `max_pixels`, and `total_pixels`, which the server always sets (qwen-vl-utils' own default
would let one video take ~115k tokens).
"""

from __future__ import annotations

from typing import Any

from ..error_catalogue import (
    INVALID_VALUE,
    INVALID_VIDEO,
    INVALID_VIDEO_URL,
    TOO_MANY_VIDEOS,
    VIDEO_FETCH_FAILED,
    VIDEO_FETCH_TIMEOUT,
    VIDEO_TOO_LARGE,
    VIDEO_URL_FORBIDDEN,
)
from ..transport.contract import SNIFF_BYTES, Input, sniff_video, video_option_bounds
from .kinds import MediaKind

# The containers the model's decode sandbox opens (AVI is sniffed by the contract but not on
# the sandbox's allowlist: refused here before it travels).
_CONTAINERS = ("iso", "ebml", "frames")


def is_known_video(data: bytes) -> bool:
    """Container signatures (the contract's sniffer; declared types are not trusted) of the
    allowlisted containers, or a checked frame list."""
    return sniff_video(data) in _CONTAINERS


def video_budget(
    source: Any, server: Any, defaults: tuple[int | None, int | None], param: str
) -> dict[str, Any]:
    """The chat-part keys of one video, each only within the model's limits (`server.model`,
    per-frame pixels within `server.pixels`); the server's total pixel budget always goes."""
    model = server.model
    bounds = video_option_bounds(model)  # the model's rule; pixel bounds narrowed below
    budget: dict[str, Any] = {"total_pixels": model.video_total_pixels}
    for key in ("fps", "max_frames", "total_pixels"):
        value = getattr(source, key)
        if value is None:
            continue
        low, high, low_excluded = bounds[key]
        if key == "total_pixels":  # declared narrowing: the proxy's --image-min-pixels
            low = server.pixels.min_pixels
        budget[key] = _within(value, low, high, f"{param}.{key}", low_excluded)
    for key in ("min_pixels", "max_pixels"):
        value = getattr(source, key)
        if value is not None:
            budget[key] = server.pixels.check(value, f"{param}.{key}")
    if budget.get("min_pixels", 0) > budget.get("max_pixels", float("inf")):
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': min_pixels exceeds max_pixels for this video.",
        )
    return budget


def _within(value, low, high, param: str, exclusive_low: bool = False):
    if value > high or value < low or (exclusive_low and value == low):
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': {value} is outside this server's range "
            f"{'(' if exclusive_low else '['}{low}, {high}].",
        )
    return value


VIDEO = MediaKind(
    part_type="video_url",
    name="video",
    tensor=Input.VIDEO,
    media_types=frozenset({"video/mp4", "video/webm", "video/quicktime", "video/x-matroska"}),
    frame_types=frozenset({"video/jpeg", "video/png", "video/webp"}),
    data_url_form="data:video/(mp4|webm|quicktime|x-matroska);base64,<data>, or a frame list "
    "data:video/(jpeg|png|webp);base64,<frame>,<frame>,...",
    formats="MP4, WebM, MOV or MKV",
    recognise=is_known_video,
    sniff_bytes=SNIFF_BYTES,
    max_parts=lambda limits: limits.max_videos,
    max_bytes=lambda limits: limits.max_video_bytes,
    fetch_max_bytes=lambda policy: policy.video_max_bytes,
    fetch_timeout_s=lambda policy: policy.video_timeout_s,
    budget=video_budget,
    inspect=None,  # bytes only: the container is the model's to read
    too_many=TOO_MANY_VIDEOS,
    invalid=INVALID_VIDEO,
    bad_url=INVALID_VIDEO_URL,
    forbidden_url=VIDEO_URL_FORBIDDEN,
    too_large=VIDEO_TOO_LARGE,
    fetch_failed=VIDEO_FETCH_FAILED,
    fetch_timeout=VIDEO_FETCH_TIMEOUT,
)
