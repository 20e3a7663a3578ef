"""What the Triton model and the OpenAI proxy must agree on: tensor names, the model's limits
and how an error crosses gRPC.

Tensors: `INPUTS` and `OUTPUTS` are the names in config.pbtxt (a test checks them). The
`describe` input asks the model for its limits instead of a completion: one response whose
`text_output` is `ModelLimits.encode()`, then the final flag.

Limits: `ModelLimits` holds what a request may ask of the model as the running model has it,
config.pbtxt with the `QWEN_VL_*` environment overrides applied. Its defaults are the model's
defaults; the proxy uses them too when the model cannot be asked.

Errors: gRPC streaming carries only an error *message* to the client, no status code, so the
model writes its errors as data: a fixed prefix, then a JSON object {"kind", "message",
"param", "code"}. `kind` says what the client should do:
- invalid_request: the request is wrong (HTTP 400); `message` is written for the client and
  `param` is the client's path to the offending field (`messages[1].content[2].image_url`:
  the model keeps the message and part indices of the request it got, and the proxy keeps
  the client's);
- busy: the model's queue is full, retry later (HTTP 503 with Retry-After);
- unavailable: the model is shutting down, retry elsewhere (HTTP 503);
- internal: the server failed (HTTP 500); `message` carries only the request id.

This file exists twice, byte for byte: here (the model folder deploys on its own) and as
proxy/transport/contract.py (the proxy image has no model folder).
tests/unit/test_model_contract.py fails when the copies differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

INPUTS = (
    "messages",
    "text_input",
    "image",
    "video",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "tools",
    "describe",
)
OUTPUTS = (
    "text_output",
    "finish_reason",
    "num_input_tokens",
    "num_output_tokens",
    "num_image_tokens",
    "num_video_tokens",
    "logprobs",
    "index",
)
DESCRIBE_INPUT = "describe"

# The highest `fps` a video part may ask to be sampled at; max_video_frames bounds the cost.
MAX_VIDEO_FPS = 60.0

# Qwen2.5-VL merges 2x2 patches of 14x14 pixels into one visual token: 28x28 pixels each.
PIXELS_PER_TOKEN = 28 * 28


@dataclass(frozen=True)
class ModelLimits:
    # Every image is resized onto the 28-pixel grid with its area in [min_pixels, max_pixels];
    # a request may ask for any budget inside that range.
    min_pixels: int = 4 * PIXELS_PER_TOKEN
    max_pixels: int = 1280 * PIXELS_PER_TOKEN
    max_images: int = 16
    # Width x height per image from its header, before decoding (40 MP = 120 MB of RGB).
    max_source_pixels: int = 40_000_000
    # qwen-vl-utils refuses to resize images more elongated than this.
    max_aspect_ratio: float = 200.0
    # A request's max_tokens is clamped to this.
    max_tokens: int = 8192
    # Choices (`n`) per request; each takes a KV-cache slot.
    max_choices: int = 8
    # Videos (the `video` input and inline video_url parts) per request.
    max_videos: int = 2
    # Longest clip by its container header, refused before decoding.
    max_video_seconds: int = 600
    # Frames sampled from one video (an even count; a frame list may hold at most this many).
    max_video_frames: int = 64
    # Frames per second sampled when the part names no fps (qwen-vl-utils' default).
    video_fps: float = 2.0
    # One video's pixel budget over all its sampled frames, about total_pixels / 784 visual
    # tokens: 4096 tokens, half of a default 8192-token slot; at 64 frames each gets 128
    # tokens (qwen-vl-utils' per-frame minimum), fewer frames get more (up to 768 each).
    video_total_pixels: int = 4096 * PIXELS_PER_TOKEN
    # Width x height per frame from the container header, before decoding (4K UHD).
    max_video_source_pixels: int = 3840 * 2160
    # Prompt plus completion tokens; 0 when not known (the checkpoint is not loaded).
    context_length: int = 0

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> ModelLimits | None:
        """The limits in a `describe` response; None when the text is not such an object.
        Fields it lacks (an older model) keep their defaults; unknown ones are ignored."""
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        values = {}
        for field in fields(cls):
            value = raw.get(field.name)
            if _is_number(value) and value >= 0:
                values[field.name] = type(field.default)(value)
        return cls(**values)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


ERROR_PREFIX = "qwen_vl_error: "
ERROR_KINDS = ("invalid_request", "busy", "unavailable", "internal")


@dataclass(frozen=True)
class ModelError:
    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    def encode(self) -> str:
        return ERROR_PREFIX + json.dumps(asdict(self), ensure_ascii=False)


def decode_error(text: str) -> ModelError | None:
    """The model's error in a Triton error message; None for anything else (Triton's own)."""
    if not text.startswith(ERROR_PREFIX):
        return None
    try:
        fields = json.loads(text[len(ERROR_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("kind") not in ERROR_KINDS:
        return None
    text_or_none = lambda value: value if isinstance(value, str) else None  # noqa: E731
    return ModelError(
        fields["kind"],
        str(fields.get("message") or ""),
        text_or_none(fields.get("param")),
        text_or_none(fields.get("code")),
    )
