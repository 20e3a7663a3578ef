"""The chat-completions request body, validated with pydantic.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do: clients send
fields this server has no use for (`user`, `logprobs`, `tools`, ...) and must not get 422s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import APIError


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        # Some clients send `"image_url": "data:..."` instead of `{"url": "data:..."}`.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    # `developer` is OpenAI's newer name for `system`; `tool` carries tool results.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required, but null is allowed: assistant turns that only carried tool calls have none.
    content: str | list[ContentPart] | None


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_limit(self) -> int | None:
        # `max_completion_tokens` replaced `max_tokens` in OpenAI's API; the newer name wins.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


def parse_chat_request(body: dict[str, Any], served_model_name: str) -> ChatCompletionRequest:
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body) from None
    if chat.model is not None and chat.model != served_model_name:
        raise APIError(
            404,
            f"The model `{chat.model}` does not exist. This server serves `{served_model_name}`.",
            param="model",
            code="model_not_found",
        )
    if chat.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_parameter")
    return chat


def validation_api_error(exc: ValidationError, body: Any) -> APIError:
    """The most specific pydantic error as a 400 envelope, its input position as `param`."""
    candidates = [(_input_path(err["loc"], body, err["type"]), err) for err in exc.errors()]
    path, err = max(candidates, key=lambda item: len(item[0]))  # max keeps the first of ties
    param = format_param(path)
    if err["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
        return APIError(400, message, param=param or None, code="missing_required_parameter")
    # A value that fits none of a union's members fails once per member; name them all.
    reasons = dict.fromkeys(e["msg"] for p, e in candidates if p == path)
    message = f"Invalid value for '{param}': {' or '.join(reasons)}."
    return APIError(400, message, param=param or None, code="invalid_value")


def _input_path(loc: tuple[int | str, ...], body: Any, error_type: str) -> list[int | str]:
    """Keeps the parts of a pydantic location that index the client's JSON.

    Pydantic also puts union-member names (`str`, `list[...]`, discriminator tags) into
    `loc`; those name no position in the input, so a part that does not resolve against the
    body is dropped, except a trailing missing field name.
    """
    path: list[int | str] = []
    node = body
    for position, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        elif not (error_type == "missing" and position == len(loc) - 1):
            continue
        path.append(part)
    return path


def format_param(path: list[int | str]) -> str:
    """`["messages", 0, "content"]` -> `messages[0].content`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
