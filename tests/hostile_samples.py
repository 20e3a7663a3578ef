"""Odd, broken and hostile images for the hardening tests."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image
from sample_images import encode


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its tiny data never delivers: a bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [Image.new("P", (12, 12), color) for color in (1, 2, 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


GOOD_PNG = encode(Image.new("RGB", (32, 24), (200, 30, 30)), "PNG")
GOOD_JPEG = encode(Image.new("RGB", (32, 24), (30, 200, 30)), "JPEG")
CMYK_JPEG = encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG")
PNG_16BIT = encode(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG")
ANIMATED_GIF = animated_gif()
WEBP = encode(Image.new("RGB", (20, 10), (1, 2, 3)), "WEBP")
ONE_BY_ONE = encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")
ONE_BY_10000 = png_header_only(1, 10_000)
BOMB_PNG = png_header_only(100_000, 100_000)  # 10 gigapixels claimed, a few bytes sent
OVER_40MP_PNG = png_header_only(8_000, 6_000)  # 48 MP: over the default, under Pillow's bomb
TRUNCATED_HEADER_PNG = GOOD_PNG[:20]  # cut inside IHDR: no size to read
TRUNCATED_JPEG = GOOD_JPEG[:40]  # cut before the frame header
CORRUPT_JPEG = b"\xff\xd8\xff" + b"\x00\x13garbage-not-a-jpeg" * 20
NOT_AN_IMAGE = b"%PDF-1.7 not an image"
