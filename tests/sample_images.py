"""Small images for tests, encoded in memory."""

import base64
import io

from PIL import Image


def encoded_image(fmt: str = "JPEG", size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(fmt: str = "JPEG", **kwargs) -> str:
    mime = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(encoded_image(fmt, **kwargs)).decode()
