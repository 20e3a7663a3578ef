"""Pure translation between OpenAI chat JSON and the Triton model's request/response contract.

The one impure step, loading the media a request points to, sits between `prepare_chat`
and `PreparedChat.to_triton` (proxy/media/kinds.py, proxy/media/fetch.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..media.kinds import MediaRef
from ..media.pixels import PixelLimits
from ..transport.backend import TritonRequest
from ..transport.contract import DEFAULT_PRIORITY, ModelLimits, Priority
from .limits import RequestLimits
from .paths import ClientPaths
from .schema import SAMPLING_FIELDS, ChatCompletionRequest, ChatMessage, MediaPart, RawPrompt
from .structured import structured


@dataclass(frozen=True)
class ServerLimits:
    """Server-wide bounds a request is translated within (from ProxyConfig)."""

    # the model's default range; the proxy passes the model's own, narrowed by its flags
    pixels: PixelLimits = field(default_factory=lambda: PixelLimits().within(ModelLimits()))
    max_tokens: int = 0  # 0: no proxy-side limit
    model: ModelLimits = field(default_factory=ModelLimits)  # the model's own (video budgets)


# ---- request: OpenAI -> Triton ---------------------------------------------------------


@dataclass(frozen=True)
class PreparedChat:
    """A request translated for the model, except the media bytes its parts point to."""

    messages: list[dict[str, Any]]
    media: list[MediaRef]
    sampling_parameters: dict[str, Any]
    stream: bool
    tools_json: str | None = None
    parse_tool_calls: bool = False  # the output may hold tool calls (proxy/request/tool_calls.py)
    prompt: RawPrompt | None = None  # taken as it is instead of `messages`
    priority: Priority = DEFAULT_PRIORITY
    timings: bool = False  # ask the model for the request's stage timings

    def to_triton(self, model: str, media: list[bytes]) -> TritonRequest:
        """`media`: the encoded bytes of `self.media`, in the same order; each kind travels
        in its own input, in order of appearance."""
        if len(media) != len(self.media):
            raise ValueError(f"expected {len(self.media)} media parts, got {len(media)}")
        tensors: dict[str, list[bytes]] = {}
        for ref, data in zip(self.media, media, strict=True):
            tensors.setdefault(ref.kind.tensor, []).append(data)
        return TritonRequest(
            model=model,
            messages_json=None if self.prompt else json.dumps(self.messages, ensure_ascii=False),
            text_input=self.prompt.text if self.prompt else None,
            input_ids=self.prompt.token_ids if self.prompt else None,
            media=tensors,
            sampling_parameters=self.sampling_parameters,
            stream=self.stream,
            tools_json=self.tools_json,
            priority=self.priority,
            return_timings=self.timings,
        )


def prepare_chat(
    chat: ChatCompletionRequest, limits: ServerLimits, request_limits: RequestLimits | None = None
) -> PreparedChat:
    """Validates what needs the server's limits (400 APIError) and translates the rest."""
    messages, media = translate_messages(chat, limits)
    tools = structured(chat, request_limits or RequestLimits().within(limits.model))
    sampling = sampling_parameters(chat, limits.max_tokens)
    if tools.constraint is not None:
        sampling["structured"] = tools.constraint
    return PreparedChat(
        messages=messages,
        media=media,
        sampling_parameters=sampling,
        stream=chat.is_stream,
        tools_json=tools.tools_json,
        parse_tool_calls=tools.parse_tool_calls,
        prompt=chat.prompt,
        priority=chat.priority_class,
    )


def translate_messages(
    chat: ChatCompletionRequest, limits: ServerLimits
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages for the model's chat template, and the media their media parts refer to.

    Each media part becomes its kind's chat part with its budget, e.g. `{"type": "image",
    "min_pixels": N, "max_pixels": M}`; the model pairs those with its kind's input elements
    in order of appearance, across all turns. Message and part indices are kept, so the
    model's error `param`s are the internal request's paths (`chat.paths` makes them the
    client's).
    """
    defaults = (
        limits.pixels.check(chat.min_pixels, chat.paths("min_pixels")),
        limits.pixels.check(chat.max_pixels, chat.paths("max_pixels")),
    )
    media: list[MediaRef] = []
    translated = []
    for i, message in enumerate(chat.messages):
        # The chat template knows `system`; `developer` is OpenAI's newer name for it.
        role = "system" if message.role == "developer" else message.role
        content = _translate_content(message, i, chat.paths, media, limits, defaults)
        entry: dict[str, Any] = {"role": role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        translated.append(entry)
    return translated, media


def _translate_content(
    message: ChatMessage,
    index: int,
    paths: ClientPaths,
    media: list[MediaRef],
    limits: ServerLimits,
    defaults: tuple[int | None, int | None],
) -> str | list[dict[str, Any]]:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content):
        if isinstance(part, MediaPart):
            param = paths(f"messages[{index}].content[{j}].{part.kind.part_type}")
            budget = part.kind.budget(part.source, limits, defaults, param)
            ref = MediaRef(part.kind, part.source.url, param, tuple(budget.items()))
            media.append(ref)
            parts.append(ref.chat_part())
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def sampling_parameters(chat: ChatCompletionRequest, max_tokens_limit: int = 0) -> dict[str, Any]:
    """Only what the client set, so the model's own defaults apply to the rest: the fields
    proxy/request/schema.py marks as the model's (`SAMPLING_FIELDS`) as they are, and those that need
    a word of translation."""
    params = {name: getattr(chat, name) for name in SAMPLING_FIELDS}
    max_tokens = chat.token_limit
    if max_tokens is not None and max_tokens_limit > 0:
        max_tokens = min(max_tokens, max_tokens_limit)
    params["max_tokens"] = max_tokens
    params["stop"] = ([chat.stop] if isinstance(chat.stop, str) else chat.stop) or None
    params["n"] = chat.n if chat.n and chat.n > 1 else None
    if chat.wants_logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = chat.top_logprobs or 0
    if chat.repetition_guard is not None:
        params["repetition_guard"] = chat.repetition_guard.model_dump(exclude_none=True)
    return {name: value for name, value in params.items() if value is not None}
