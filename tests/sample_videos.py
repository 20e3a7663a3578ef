"""Videos made in the tests with PyAV: short clips in a container, audio-only files, frame lists."""

import base64
import io

import av
import numpy as np
from sample_images import encoded_image


def clip(fmt="mp4", codec="mpeg4", seconds=2.0, fps=30, size=(64, 48), audio=False) -> bytes:
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 12
        for i in range(int(seconds * fps)):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[..., 0] = (i * 7) % 255
            pixels[:, : i % width] = 200
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def hostile_clips() -> dict[str, bytes]:
    """Containers the decode sandbox must refuse before decoding a packet: a JPEG 2000 stream
    (the codec of CVE-2026-22778) in each allowlisted container, a lossless codec outside the
    list, and a container outside it."""
    short = {"seconds": 0.2, "fps": 10}
    return {
        "jpeg2000-mp4": clip("mp4", "jpeg2000", **short),
        "jpeg2000-mkv": clip("matroska", "jpeg2000", **short),
        "jpeg2000-mov": clip("mov", "jpeg2000", **short),
        "ffv1-mkv": clip("matroska", "ffv1", **short),
        "mpeg4-avi": clip("avi", "mpeg4", **short),
    }


def audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def frame_list(count=3, fmt="JPEG", media="jpeg", size=(64, 48)) -> str:
    frames = [
        base64.b64encode(encoded_image(fmt, size=size, color=(i * 40, 30, 30))).decode()
        for i in range(count)
    ]
    return f"data:video/{media};base64," + ",".join(frames)
