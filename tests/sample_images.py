"""Small images for tests, encoded in memory (`helpers.data_url` makes a data URL of one)."""

import io

from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """`image` as a file of format `fmt` (Pillow's name: "PNG", "JPEG", ...) would hold it."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def encoded_image(fmt: str = "JPEG", size=(64, 48), color=(200, 30, 30)) -> bytes:
    """A plain `color` RGB image of `size`, encoded as `fmt`."""
    return encode(Image.new("RGB", size, color), fmt)
