"""Video elements of the `video` input → sampled, resized RGB frames, Qwen's way.

An element is either the bytes of a container (MP4, WebM, MOV, MKV, ...: whatever PyAV's
bundled FFmpeg demuxes) or a frame list, the ASCII text
`data:video/jpeg;base64,<f1>,<f2>,...` (also `video/png`, `video/webp`): frames the client
already sampled, each the base64 of an image.

Containers: the header (duration, frame count, rate, size) is checked before any frame is
decoded; frames are sampled as qwen-vl-utils' `smart_nframes` does (the requested fps, clamped
to [4, max_frames], an even count, evenly spaced) and decoded sequentially only up to the last
one needed. Frames then get qwen-vl-utils' `fetch_video` budget: a per-video pixel budget
(`total_pixels`) shared by the frames, on the 28-pixel grid (resized with Pillow's bicubic, as
qwen-vl-utils resizes images). All of it runs in the decode sandbox (sandbox.py), only on
allowlisted containers and codecs; this side parses elements and builds the tensors.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import asdict, dataclass

import torch

from ..contract import FRAME_FORMATS, ModelLimits, sniff_video, split_data_url
from ..engine.timings import counts_as_media_decode
from ..errors import RequestError
from . import decoding
from .sandbox import sample_indices  # noqa: F401  (qwen-vl-utils' smart_nframes, for callers)

FRAME_LIST_TYPES = FRAME_FORMATS  # what a client-sampled frame list may hold
# Beyond a video's own decode timeout (checked inside the worker), the time its worker may
# take before it is deemed hung and killed.
HANG_GRACE_S = 5.0


@dataclass
class VideoOptions:
    """How one video is sampled and sized (server defaults, narrowed by the part's keys)."""

    fps: float
    max_frames: int
    min_pixels: int
    max_pixels: int
    total_pixels: int
    timeout_s: float = 30.0


@dataclass
class Video:
    frames: torch.Tensor  # (T, 3, H, W) uint8, H and W multiples of 28, T even
    fps: float  # frames per second of the sampled frames (sets second_per_grid_ts)
    decoded_frames: int = 0  # frames the decoder produced to get them (containers)


# ---- elements ----------------------------------------------------------------------------


def _b64(text: str | bytes, param: str, what: str) -> bytes:
    try:
        if isinstance(text, bytes):
            text = text.decode("ascii")
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{what} is not valid base64", param, "invalid_video") from exc


def video_data_url(url: str | bytes, param: str) -> tuple[str, str]:
    """(subtype, payload) of `data:video/<subtype>;base64,<payload>` (the contract's parser)."""
    if isinstance(url, bytes):
        url = url.decode("ascii", errors="replace")
    media_type, payload = split_data_url(url) or ("", "")
    if not media_type.startswith("video/"):
        raise RequestError(
            "video data URL must look like data:video/<type>;base64,<data>", param, "invalid_video"
        )
    return media_type.removeprefix("video/"), payload


@counts_as_media_decode
def load_video(
    element: bytes | str, param: str, limits: ModelLimits, options: VideoOptions
) -> Video:
    """One `video` element (or an inline data URL) → a Video; errors name `param`."""
    head = element[:5]
    if (head.lower() if isinstance(head, str) else head.lower().decode("latin-1")) == "data:":
        subtype, payload = video_data_url(element, param)
        if subtype in FRAME_LIST_TYPES:
            return frame_list(payload, param, limits, options)
        data = _b64(payload, param, "video")
    else:
        data = element.encode("latin-1") if isinstance(element, str) else bytes(element)
    return decode_container(data, param, limits, options)


def _args(limits: ModelLimits, options: VideoOptions, **extra) -> dict:
    return {
        "limits": {
            "max_source_pixels": limits.max_source_pixels,
            "max_aspect_ratio": limits.max_aspect_ratio,
            "max_video_source_pixels": limits.max_video_source_pixels,
            "max_video_seconds": limits.max_video_seconds,
        },
        "options": asdict(options),
        **extra,
    }


def _video(pixels, meta: list) -> Video:
    frames = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return Video(frames, float(meta[0]), int(meta[1]))


def frame_list(payload: str, param: str, limits: ModelLimits, options: VideoOptions) -> Video:
    """Frames the client sampled: each decoded with the image checks, an even count."""
    data = payload.encode("ascii", errors="replace") if isinstance(payload, str) else payload
    timeout = options.timeout_s + HANG_GRACE_S
    pixels, meta = decoding.run("frames", data, _args(limits, options), timeout, param, "video")
    return _video(pixels, meta)


def decode_container(data: bytes, param: str, limits: ModelLimits, options: VideoOptions) -> Video:
    """A container's sampled, resized frames; refused unless its signature, demuxer and codecs
    are on the sandbox's allowlists."""
    family = sniff_video(data)
    if family not in ("iso", "ebml"):
        raise RequestError("video is not an MP4, MOV, WebM or MKV file", param, "invalid_video")
    args = _args(limits, options, family=family)
    timeout = options.timeout_s + HANG_GRACE_S
    pixels, meta = decoding.run("video", data, args, timeout, param, "video")
    return _video(pixels, meta)
