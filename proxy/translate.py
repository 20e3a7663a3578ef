"""Pure translation between OpenAI chat JSON and the Triton model's request/response contract."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import APIError
from .schema import ChatCompletionRequest, ChatMessage, ImagePart

# Clients often write image/jpg; the bytes are checked against known signatures below anyway.
_DATA_URL = re.compile(
    r"data:(?P<media_type>image/(?:jpeg|jpg|png|webp|gif))"
    r"(?P<params>(?:;[^;,]*)*?);base64,(?P<payload>.*)",
    re.IGNORECASE | re.DOTALL,
)
_WHITESPACE = re.compile(rb"\s+")
_REMOTE_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class TritonRequest:
    """What the proxy sends to the Triton model, before it becomes tensors."""

    messages_json: str
    images: list[bytes]
    sampling_parameters: dict[str, Any]
    stream: bool


@dataclass
class TokenUsage:
    """Token counts of one completion, filled in as responses arrive."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True)
class CompletionIdentity:
    """The fields every response body and chunk of one completion share."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> CompletionIdentity:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


# ---- request: OpenAI -> Triton ---------------------------------------------------------


def to_triton_request(chat: ChatCompletionRequest) -> TritonRequest:
    messages, images = translate_messages(chat.messages)
    return TritonRequest(
        messages_json=json.dumps(messages, ensure_ascii=False),
        images=images,
        sampling_parameters=sampling_parameters(chat),
        stream=chat.is_stream,
    )


def translate_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Messages for the model's chat template, and the image bytes their `image` parts refer to.

    Each image part becomes `{"type": "image"}`; the model pairs them with `images` in order.
    """
    images: list[bytes] = []
    translated = []
    for i, message in enumerate(messages):
        # The chat template knows `system`; `developer` is OpenAI's newer name for it.
        role = "system" if message.role == "developer" else message.role
        translated.append({"role": role, "content": _translate_content(message, i, images)})
    return translated, images


def _translate_content(
    message: ChatMessage, index: int, images: list[bytes]
) -> str | list[dict[str, Any]]:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            param = f"messages[{index}].content[{j}].image_url"
            images.append(load_image_bytes(part.image_url.url, param))
            parts.append({"type": "image"})
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def sampling_parameters(chat: ChatCompletionRequest) -> dict[str, Any]:
    """Only what the client set, so the model's own defaults apply to the rest."""
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop
    params = {
        "max_tokens": chat.token_limit,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "top_k": chat.top_k,
        "seed": chat.seed,
        "stop": stop or None,
        "repetition_penalty": chat.repetition_penalty,
    }
    return {name: value for name, value in params.items() if value is not None}


# ---- images ----------------------------------------------------------------------------


def load_image_bytes(url: str, param: str) -> bytes:
    """The encoded image an `image_url` refers to; the one place new URL kinds get added."""
    if url.lower().startswith(_REMOTE_SCHEMES):
        raise APIError(
            400,
            "Remote image URLs are not enabled on this server yet; "
            "send the image inline as a base64 data: URL.",
            param=param,
            code="unsupported_image_url",
        )
    if url[:5].lower() != "data:":
        raise APIError(
            400,
            "Unsupported image URL: expected a data:image/...;base64 URL.",
            param=param,
            code="invalid_image_url",
        )
    return decode_data_url(url, param)


def decode_data_url(url: str, param: str) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise APIError(
            400,
            "Invalid image data URL: expected data:image/(jpeg|png|webp|gif);base64,<data>.",
            param=param,
            code="invalid_image",
        )
    payload = _WHITESPACE.sub(b"", match["payload"].encode("ascii", "replace"))
    try:
        image = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, "Invalid base64 image data.", param=param, code="invalid_image"
        ) from None
    if not is_known_image(image):
        raise APIError(
            400,
            "The image data is not a JPEG, PNG, WebP or GIF image.",
            param=param,
            code="invalid_image",
        )
    return image


def is_known_image(data: bytes) -> bool:
    return (
        data.startswith(b"\xff\xd8\xff")  # JPEG
        or data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith((b"GIF87a", b"GIF89a"))
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


# ---- responses: Triton -> OpenAI -------------------------------------------------------


def completion_body(
    identity: CompletionIdentity, text: str, finish_reason: str, usage: TokenUsage
) -> dict[str, Any]:
    return {
        "id": identity.id,
        "object": "chat.completion",
        "created": identity.created,
        "model": identity.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.as_dict(),
    }


def chunk_body(
    identity: CompletionIdentity,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    *,
    include_usage: bool = False,
) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice; `usage: null` when usage was asked for."""
    body = _chunk_envelope(identity)
    body["choices"] = [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(identity: CompletionIdentity, usage: TokenUsage) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the totals."""
    body = _chunk_envelope(identity)
    body["choices"] = []
    body["usage"] = usage.as_dict()
    return body


def _chunk_envelope(identity: CompletionIdentity) -> dict[str, Any]:
    return {
        "id": identity.id,
        "object": "chat.completion.chunk",
        "created": identity.created,
        "model": identity.model,
    }
