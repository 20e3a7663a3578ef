"""Video elements of the `video` input → sampled, resized RGB frames, Qwen's way.

An element is either the bytes of a container (MP4, WebM, MOV, MKV, ...: whatever PyAV's
bundled FFmpeg demuxes) or a frame list, the ASCII text
`data:video/jpeg;base64,<f1>,<f2>,...` (also `video/png`, `video/webp`): frames the client
already sampled, each the base64 of an image.

Containers: the header (duration, frame count, rate, size) is checked before any frame is
decoded; frames are sampled as qwen-vl-utils' `smart_nframes` does (the requested fps, clamped
to [4, max_frames], an even count, evenly spaced) and decoded sequentially only up to the last
one needed. Frames then get qwen-vl-utils' `fetch_video` resize: a per-video pixel budget
(`total_pixels`) shared by the frames, on the 28-pixel grid.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..contract import FRAME_FORMATS, PIXELS_PER_TOKEN, ModelLimits, split_data_url
from ..engine.timings import counts_as_media_decode
from ..errors import RequestError
from .images import decode_image

FRAME_FACTOR = 2  # Qwen2.5-VL's temporal patch: frames go into the tower in pairs
MIN_FRAMES = 4  # qwen-vl-utils' FPS_MIN_FRAMES
FRAME_MAX_PIXELS = 768 * PIXELS_PER_TOKEN  # qwen-vl-utils' VIDEO_MAX_TOKEN_NUM per frame
MAX_CONTAINER_FPS = 240  # a header claiming more frames per second than this is refused
FRAME_LIST_TYPES = FRAME_FORMATS  # what a client-sampled frame list may hold
GRID = 28


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


def frame_list(payload: str, param: str, limits: ModelLimits, options: VideoOptions) -> Video:
    """Frames the client sampled: each decoded with the image checks, an even count."""
    parts = [p for p in payload.split(",")]
    if not parts or any(not p.strip() for p in parts):
        raise RequestError("video frame list has an empty frame", param, "invalid_video")
    if len(parts) > options.max_frames:
        raise RequestError(
            f"video has {len(parts)} frames; at most {options.max_frames} are accepted",
            param,
            "video_too_large",
        )
    frame_limits = replace(limits, max_source_pixels=limits.max_video_source_pixels)
    deadline = time.monotonic() + options.timeout_s
    images = []
    for index, part in enumerate(parts):
        _check_deadline(deadline, param, options)
        data = _b64(part, param, f"video frame {index}")
        try:
            image = decode_image(data, param, frame_limits)
        except RequestError as exc:
            code = "video_too_large" if exc.code == "image_too_large" else "invalid_video"
            raise RequestError(f"video frame {index}: {exc.message}", param, code) from exc
        images.append(np.asarray(image))
    if len({a.shape for a in images}) > 1:
        raise RequestError("video frames must all have the same size", param, "invalid_video")
    while len(images) < MIN_FRAMES or len(images) % FRAME_FACTOR:
        images.append(images[-1])  # pad as qwen-vl-utils does: repeat the last frame
    frames = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return Video(resize(frames, options, param), options.fps)


# ---- containers --------------------------------------------------------------------------


@dataclass
class ContainerInfo:
    duration: float  # seconds
    frames: int  # the header's count, or duration x rate when the header has none
    rate: float  # frames per second
    width: int
    height: int
    codec: str


def _check_deadline(deadline: float, param: str, options: VideoOptions) -> None:
    if time.monotonic() > deadline:
        raise RequestError(
            f"video took longer than {options.timeout_s:g} s to decode", param, "video_too_large"
        )


def probe(container, param: str, limits: ModelLimits) -> ContainerInfo:
    """The video stream's header, refused when over the limits or implausible."""
    if not container.streams.video:
        raise RequestError("video has no video stream", param, "invalid_video")
    stream = container.streams.video[0]
    codec = stream.codec_context
    width, height = int(codec.width or 0), int(codec.height or 0)
    rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if duration <= 0 and container.duration is not None:
        duration = container.duration / 1_000_000  # av.time_base
    frames = int(stream.frames or 0)
    if frames <= 0 and duration > 0 and rate > 0:
        frames = round(duration * rate)
    if duration <= 0 and frames > 0 and rate > 0:
        duration = frames / rate
    if width < 1 or height < 1:
        raise RequestError("video has no picture size in its header", param, "invalid_video")
    if frames <= 0 or duration <= 0 or not math.isfinite(duration) or rate <= 0:
        raise RequestError("video has no frames", param, "invalid_video")
    if width * height > limits.max_video_source_pixels:
        raise RequestError(
            f"video is {width}x{height} pixels; at most {limits.max_video_source_pixels} "
            "pixels per frame are accepted",
            param,
            "video_too_large",
        )
    if duration > limits.max_video_seconds:
        raise RequestError(
            f"video is {duration:.1f} s long; at most {limits.max_video_seconds} s are accepted",
            param,
            "video_too_large",
        )
    if rate > MAX_CONTAINER_FPS or frames > max(duration, 1.0) * MAX_CONTAINER_FPS:
        raise RequestError(
            f"video header claims {frames} frames in {duration:.1f} s", param, "invalid_video"
        )
    return ContainerInfo(duration, frames, rate, width, height, stream.codec_context.name)


def sample_indices(total: int, rate: float, fps: float, max_frames: int) -> list[int]:
    """qwen-vl-utils' smart_nframes: total / rate * fps frames, clamped to [4, max_frames]
    and to the clip, an even count, evenly spaced over the clip."""
    low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = max(FRAME_FACTOR, max_frames // FRAME_FACTOR * FRAME_FACTOR)
    wanted = min(max(total / rate * fps, low), high, total)
    count = max(FRAME_FACTOR, int(wanted // FRAME_FACTOR) * FRAME_FACTOR)
    return torch.linspace(0, total - 1, count).round().long().tolist()


def decode_container(data: bytes, param: str, limits: ModelLimits, options: VideoOptions) -> Video:
    import av

    deadline = time.monotonic() + options.timeout_s
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise RequestError("video could not be opened", param, "invalid_video") from exc
    try:
        info = probe(container, param, limits)
        indices = sample_indices(info.frames, info.rate, options.fps, options.max_frames)
        frames, decoded = _decode_at(container, info, indices, param, limits, options, deadline)
    finally:
        container.close()
    if len({a.shape for a in frames}) > 1:
        raise RequestError("video changes size mid-stream", param, "invalid_video")
    tensor = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    sample_fps = len(indices) / info.frames * info.rate
    return Video(resize(tensor, options, param), sample_fps, decoded)


def _decode_at(container, info, indices, param, limits, options, deadline):
    """The frames shown at `indices` / rate seconds, decoded in order and only as far as the
    last one. Between far-apart targets it seeks (to the keyframe before the next target) once
    it has seen the keyframe interval (between keyframes decoded one after the other) and the
    gap is over twice that, so a sparse sample of a long clip does not decode every frame. A
    seek that lands at or behind where decoding was (a longer GOP than seen) turns seeking off:
    from there it decodes straight through.
    Returns (frames as HxWx3 uint8 arrays, frames decoded)."""
    import av

    stream = container.streams.video[0]
    base = stream.time_base
    origin = stream.start_time or 0
    targets = [index / info.rate for index in indices]
    slack = 0.5 / info.rate
    picked: list[np.ndarray] = []
    gop = 0.0  # the longest interval seen between consecutive keyframes
    previous_key: float | None = None
    seek_from: float | None = None  # where decoding was when it last seeked
    seek_to = 0.0
    may_seek = True
    decoded = 0
    while len(picked) < len(targets):
        seeked = False
        try:
            for frame in container.decode(stream):
                _check_deadline(deadline, param, options)
                if frame.width * frame.height > limits.max_video_source_pixels:
                    raise RequestError(
                        f"video frame is {frame.width}x{frame.height} pixels; at most "
                        f"{limits.max_video_source_pixels} are accepted",
                        param,
                        "video_too_large",
                    )
                decoded += 1
                if frame.pts is not None and base is not None:
                    at = float((frame.pts - origin) * base)
                else:
                    at = (decoded - 1) / info.rate
                if seek_from is not None:  # the first frame after a seek
                    may_seek = may_seek and at > seek_from
                    gop = max(gop, seek_to - at)  # it landed this far before its target
                    seek_from = None
                if frame.key_frame:
                    if previous_key is not None and at > previous_key:
                        gop = max(gop, at - previous_key)
                    previous_key = at
                array = None
                while len(picked) < len(targets) and at >= targets[len(picked)] - slack:
                    array = frame.to_ndarray(format="rgb24") if array is None else array
                    picked.append(array)
                if len(picked) == len(targets):
                    break
                if may_seek and gop and targets[len(picked)] - at > 2 * gop:
                    seek_to = targets[len(picked)]
                    container.seek(int(seek_to / base) + origin, stream=stream, backward=True)
                    seeked, seek_from, previous_key = True, at, None
                    break
        except av.FFmpegError as exc:
            if not picked:
                raise RequestError("video could not be decoded", param, "invalid_video") from exc
            break
        if not seeked:
            break
    if not picked:
        raise RequestError("video has no decodable frames", param, "invalid_video")
    # A header that overstated the clip: the missing tail repeats the last frame.
    picked += [picked[-1]] * (len(targets) - len(picked))
    return picked, decoded


# ---- resizing ----------------------------------------------------------------------------


def frame_pixels(options: VideoOptions, frames: int) -> tuple[int, int]:
    """(min, max) pixels per frame: qwen-vl-utils' fetch_video budget, the total shared by
    the frames (two frames make one temporal patch), the part's max_pixels below it."""
    budget = max(
        min(FRAME_MAX_PIXELS, options.total_pixels / frames * FRAME_FACTOR),
        int(options.min_pixels * 1.05),
    )
    return options.min_pixels, int(min(options.max_pixels, budget))


def resize(frames: torch.Tensor, options: VideoOptions, param: str | None = None) -> torch.Tensor:
    from qwen_vl_utils import smart_resize
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    count, _, height, width = frames.shape
    low, high = frame_pixels(options, count)
    try:
        new_h, new_w = smart_resize(height, width, factor=GRID, min_pixels=low, max_pixels=high)
    except ValueError as exc:  # qwen-vl-utils refuses extreme aspect ratios
        raise RequestError(str(exc), param, "invalid_video") from exc
    if (new_h, new_w) == (height, width):
        return frames.contiguous()
    out = F.resize(
        frames.float(), [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8)
