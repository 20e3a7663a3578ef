#!/usr/bin/env python3
"""Write perf_analyzer input-data files for the qwen2_5_vl model (text and image cases).

With no arguments it rewrites the three files shipped next to this script:

- `text.json`: two text-only chat requests (English, Chinese).
- `image.json`: one image request; the JPEG travels as a `data:` URL string in the BYTES
  `image` tensor (`"content"`), which keeps the JSON plain text.
- `video.json`: one video request; the video is a frame list (four synthetic JPEG frames,
  `data:video/jpeg;base64,<frame>,<frame>,...`) in the BYTES `video` tensor, which the model
  takes as frames already sampled (a container's bytes would go the same way).
- `image_b64.json`: the same request with the JPEG as raw bytes in the `image` tensor, written
  as perf_analyzer's `{"b64": ...}` form. For a BYTES tensor that field must hold Triton's
  *serialized* tensor, base64-encoded: each element as a 4-byte little-endian length followed
  by its bytes (`bytes_tensor_b64`). Without the prefix perf_analyzer reads the JPEG's first
  four bytes as a length and the request fails with "incomplete string data".

Your own images and prompts (one request per image, or per group of images; prompts cycle):

    python bench/perf_analyzer/make_inputs.py --out-dir /tmp/my-inputs \\
        --image photo.jpg --image chart.png --prompt "Describe this image." --max-tokens 256

writes text.json (one request per prompt), image.json and image_b64.json in /tmp/my-inputs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT_PROMPTS = (
    "Explain in two sentences why streaming responses improve perceived latency.",
    "请用一句话介绍长城。",
)
DEFAULT_IMAGE_PROMPT = "Describe this image."
FLAGS = {
    "stream": [True],
    "exclude_input_in_output": [True],
    "return_finish_reason": [True],
    "return_num_output_tokens": [True],
}


def sample_jpeg_bytes(size=(448, 336)) -> bytes:
    """A small synthetic JPEG (sky, sun, grass), the same bytes on every run."""
    image = Image.new("RGB", size, (40, 110, 190))
    draw = ImageDraw.Draw(image)
    draw.ellipse((120, 80, 320, 260), fill=(240, 200, 40))
    draw.rectangle((20, 260, 428, 320), fill=(30, 150, 60))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def sample_jpeg(size=(448, 336)) -> str:
    return data_url(sample_jpeg_bytes(size))


_MIME = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"GIF87a": "gif", b"GIF89a": "gif"}


def sample_frames(count: int = 4, size=(224, 168)) -> list[bytes]:
    """JPEG frames of the sun crossing the sky, the same bytes on every run."""
    frames = []
    for index in range(count):
        image = Image.new("RGB", size, (40, 110, 190))
        draw = ImageDraw.Draw(image)
        x = 20 + index * (size[0] - 80) // max(count - 1, 1)
        draw.ellipse((x, 30, x + 60, 90), fill=(240, 200, 40))
        draw.rectangle((0, size[1] - 40, size[0], size[1]), fill=(30, 150, 60))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        frames.append(buf.getvalue())
    return frames


def frame_list(frames: list[bytes]) -> str:
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(f).decode() for f in frames)


def data_url(data: bytes) -> str:
    kind = next((name for magic, name in _MIME.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        raise ValueError("not a JPEG, PNG, WebP or GIF file")
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def bytes_tensor_b64(elements) -> str:
    """perf_analyzer's `b64` value for a BYTES tensor: Triton's serialized form (per element a
    uint32 little-endian byte length, then the bytes), base64-encoded."""
    return base64.b64encode(b"".join(struct.pack("<I", len(e)) + e for e in elements)).decode()


def case(messages, images=(), max_tokens=64, raw_images=False):
    """One request: `messages` JSON plus the flags the proxy sends; images as data URLs, or
    with raw_images as length-prefixed raw bytes in a `b64` element."""
    entry = {
        "messages": [json.dumps(messages, ensure_ascii=False)],
        "sampling_parameters": [json.dumps({"max_tokens": max_tokens, "temperature": 0})],
        **FLAGS,
    }
    if images:
        if raw_images:
            entry["image"] = {"b64": bytes_tensor_b64(images), "shape": [len(images)]}
        else:
            entry["image"] = {"content": [data_url(i) for i in images], "shape": [len(images)]}
    return entry


def image_messages(prompt: str, count: int) -> list:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}] * count + [{"type": "text", "text": prompt}],
        }
    ]


def build(prompts=None, images=None, images_per_request=1, max_tokens=64) -> dict:
    """{file name: perf_analyzer input-data document}."""
    text_prompts = list(prompts or DEFAULT_TEXT_PROMPTS)
    image_prompts = list(prompts or [DEFAULT_IMAGE_PROMPT])
    image_bytes = list(images or [sample_jpeg_bytes()])
    groups = [
        image_bytes[i : i + images_per_request]
        for i in range(0, len(image_bytes), images_per_request)
    ]
    text = [case([{"role": "user", "content": p}], max_tokens=max_tokens) for p in text_prompts]
    docs = {"text.json": text}
    for name, raw in (("image.json", False), ("image_b64.json", True)):
        docs[name] = [
            case(
                image_messages(image_prompts[n % len(image_prompts)], len(group)),
                group,
                max_tokens=max_tokens,
                raw_images=raw,
            )
            for n, group in enumerate(groups)
        ]
    video = {
        "role": "user",
        "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}],
    }
    docs["video.json"] = [
        {
            **case([video], max_tokens=max_tokens),
            "video": {"content": [frame_list(sample_frames())], "shape": [1]},
        }
    ]
    return {name: {"data": data} for name, data in docs.items()}


def write(docs: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in docs.items():
        path = out_dir / name
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="default: next to this script")
    parser.add_argument(
        "--image",
        action="append",
        type=Path,
        default=[],
        help="an image file (JPEG/PNG/WebP/GIF); repeat for more (default: a synthetic JPEG)",
    )
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a prompt; repeat for more (text.json: one request each; image files cycle them)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in args.image]
    for path, data in zip(args.image, images):
        try:
            data_url(data)
        except ValueError as err:
            parser.error(f"{path}: {err}")
    for path in write(
        build(args.prompt, images, max(1, args.images_per_request), args.max_tokens), args.out_dir
    ):
        print(path)


if __name__ == "__main__":
    main()
