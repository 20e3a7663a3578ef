"""Pure translation between OpenAI chat JSON and the Triton model's request/response contract.

The one impure step, loading the images a request points to, sits between `prepare_chat`
and `PreparedChat.to_triton` (proxy/images.py, proxy/fetch.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .backend import TritonRequest
from .images import ImageRef
from .model_contract import ModelLimits
from .pixels import PixelLimits, image_budget
from .schema import ChatCompletionRequest, ChatMessage, ImagePart


@dataclass(frozen=True)
class ServerLimits:
    """Server-wide bounds a request is translated within (from ProxyConfig)."""

    # the model's default range; the proxy passes the model's own, narrowed by its flags
    pixels: PixelLimits = field(default_factory=lambda: PixelLimits().within(ModelLimits()))
    max_tokens: int = 0  # 0: no proxy-side limit


# ---- request: OpenAI -> Triton ---------------------------------------------------------


@dataclass(frozen=True)
class PreparedChat:
    """A request translated for the model, except the image bytes its parts point to."""

    messages: list[dict[str, Any]]
    images: list[ImageRef]
    sampling_parameters: dict[str, Any]
    stream: bool

    def to_triton(self, model: str, images: list[bytes]) -> TritonRequest:
        """`images`: the encoded images of `self.images`, in the same order."""
        if len(images) != len(self.images):
            raise ValueError(f"expected {len(self.images)} images, got {len(images)}")
        return TritonRequest(
            model=model,
            messages_json=json.dumps(self.messages, ensure_ascii=False),
            images=list(images),
            sampling_parameters=self.sampling_parameters,
            stream=self.stream,
        )


def prepare_chat(chat: ChatCompletionRequest, limits: ServerLimits) -> PreparedChat:
    """Validates what needs the server's limits (400 APIError) and translates the rest."""
    messages, images = translate_messages(chat, limits.pixels)
    return PreparedChat(
        messages=messages,
        images=images,
        sampling_parameters=sampling_parameters(chat, limits.max_tokens),
        stream=chat.is_stream,
    )


def translate_messages(
    chat: ChatCompletionRequest, pixels: PixelLimits
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Messages for the model's chat template, and the images their image parts refer to.

    Each image part becomes `{"type": "image", "min_pixels": N, "max_pixels": M}`; the model
    pairs those with the `image` input's elements in order of appearance, across all turns.
    """
    default_min = pixels.check(chat.min_pixels, "min_pixels")
    default_max = pixels.check(chat.max_pixels, "max_pixels")
    images: list[ImageRef] = []
    translated = []
    for i, message in enumerate(chat.messages):
        # The chat template knows `system`; `developer` is OpenAI's newer name for it.
        role = "system" if message.role == "developer" else message.role
        content = _translate_content(message, i, images, pixels, default_min, default_max)
        translated.append({"role": role, "content": content})
    return translated, images


def _translate_content(
    message: ChatMessage,
    index: int,
    images: list[ImageRef],
    pixels: PixelLimits,
    default_min: int | None,
    default_max: int | None,
) -> str | list[dict[str, Any]]:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            param = f"messages[{index}].content[{j}].image_url"
            image_url = part.image_url
            own_min = pixels.check(image_url.min_pixels, f"{param}.min_pixels")
            own_max = pixels.check(image_url.max_pixels, f"{param}.max_pixels")
            budget = image_budget(
                pixels,
                image_url.detail,
                own_min if own_min is not None else default_min,
                own_max if own_max is not None else default_max,
                param,
            )
            images.append(ImageRef(url=image_url.url, param=param))
            parts.append(
                {
                    "type": "image",
                    "min_pixels": budget.min_pixels,
                    "max_pixels": budget.max_pixels,
                }
            )
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def sampling_parameters(chat: ChatCompletionRequest, max_tokens_limit: int = 0) -> dict[str, Any]:
    """Only what the client set, so the model's own defaults apply to the rest."""
    max_tokens = chat.token_limit
    if max_tokens is not None and max_tokens_limit > 0:
        max_tokens = min(max_tokens, max_tokens_limit)
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": chat.temperature,  # 0 means greedy to the model
        "top_p": chat.top_p,
        "top_k": chat.top_k,
        "repetition_penalty": chat.repetition_penalty,
        "presence_penalty": chat.presence_penalty,
        "frequency_penalty": chat.frequency_penalty,
        "seed": chat.seed,
        "stop": stop or None,
        "n": chat.n if chat.n and chat.n > 1 else None,
    }
    if chat.wants_logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = chat.top_logprobs or 0
    return {name: value for name, value in params.items() if value is not None}
