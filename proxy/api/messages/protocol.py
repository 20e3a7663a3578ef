"""Anthropic's Messages API (`POST /v1/messages`) on the shared request path.

A Messages request is checked here (strict pydantic; unknown fields are refused, as Anthropic
refuses them), then translated into the internal request (the chat-completions shape) with the
paths its fields came from (proxy/request/paths.py), which runs through the shared request path
unchanged (limits, media, tools, the backend, metrics):

    system (a string or text blocks)       the system message
    a user message's text, image blocks    a user message; an image's base64 source becomes a
                                           data: URL, a url source is fetched by the proxy's
                                           guarded fetcher like any image URL
    a user message's tool_result blocks    tool messages (content: a string, text and images)
    an assistant message's text, tool_use  an assistant message with tool_calls
    max_tokens (required), temperature, top_p, top_k   as they are
    stop_sequences                         stop
    tools (name, description, input_schema)  function tools
    tool_choice auto | any | tool | none   auto | required | {function} | none;
                                           disable_parallel_tool_use: parallel_tool_calls false
    metadata.user_id                       user (logged)

The model's chunks come back as a `message` object, or as Anthropic's typed SSE events:

    message_start (usage.input_tokens), ping,
    per content block: content_block_start, content_block_delta... (`text_delta`; a tool_use
        block's input as one `input_json_delta`), content_block_stop,
    message_delta (stop_reason, stop_sequence, usage.output_tokens), message_stop;
    an error after the headers went out: an `error` event, and the stream ends.

`stop_reason`: `max_tokens` when cut by length, `tool_use` when the answer holds tool calls,
`stop_sequence` (with `stop_sequence`) when the model reports which stop string ended it,
`end_turn` otherwise. Errors are Anthropic's envelope (`error_body`, declared on the route).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError

from ...error_catalogue import (
    INTERNAL_ERROR,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    UNSUPPORTED_PARAMETER,
    APIError,
)
from ...request.paths import ClientPaths
from ...request.schema import BaseModel, part_discriminator, sampling, validation_api_error
from ...request.sse import json_bytes
from ...request.tool_calls import ToolCall, ToolCallStream, split_tool_calls
from ...request.usage import TokenUsage, record_usage
from ...transport.backend import GenerationChunk
from ...transport.contract import MAX_STOP_STRINGS

log = logging.getLogger("proxy")

SUPPORTED_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result")
# Where a block type may appear (Anthropic's rule): the others are refused naming the block.
_BLOCKS_OF_ROLE = {"user": ("text", "image", "tool_result"), "assistant": ("text", "tool_use")}
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

# ---- errors ----------------------------------------------------------------------------

# Anthropic's error `type` by HTTP status; any other status: invalid_request_error below 500,
# api_error from 500. A 503 (busy, unavailable, draining) is their `overloaded_error` (their
# 529) while keeping its status and Retry-After, which load balancers and the SDKs act on.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(error: APIError, request_id: str) -> dict[str, Any]:
    """Anthropic's error envelope (the route's `error_body`, proxy/serving/routes.py). It has
    no `param`: a message that does not name the field is prefixed with its path, as
    Anthropic's own messages are (`messages[0].content[1].source: ...`)."""
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    return {
        "type": "error",
        "error": {"type": error_type(error.status), "message": message},
        "request_id": request_id,
    }


# ---- the request -----------------------------------------------------------------------


class _Strict(BaseModel):
    """Strict types and no unknown fields: Anthropic answers those with a 400 too."""

    model_config = ConfigDict(strict=True, extra="forbid")


# Anthropic's prompt-caching hint: accepted on every block, tool and system block, no effect
# here (the engine has no prompt cache to steer).
CacheControl = dict[str, Any] | None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl = None
    citations: list[Any] | None = None  # on text an earlier answer returned: not used


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal[IMAGE_MEDIA_TYPES]
    data: str


class URLSource(_Strict):
    type: Literal["url"]
    url: str


def _one_of(types: tuple[str, ...], what: str) -> Discriminator:
    """A discriminator on `type`; any other type is a 400 naming the ones accepted."""

    def kind(value: Any) -> str | None:
        found = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return found if found in types else None

    accepted = " or ".join(f"'{name}'" for name in types)
    return Discriminator(
        kind,
        custom_error_type=f"unsupported_{what.replace(' ', '_')}",
        custom_error_message=f"{what} type must be {accepted}",
    )


ImageSource = Annotated[
    Annotated[Base64Source, Tag("base64")] | Annotated[URLSource, Tag("url")],
    _one_of(("base64", "url"), "an image source"),
]


class ImageBlock(_Strict):
    type: Literal["image"]
    source: ImageSource
    cache_control: CacheControl = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl = None


ToolResultPart = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[ImageBlock, Tag("image")],
    _one_of(("text", "image"), "a tool_result content block"),
]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None  # the content says what went wrong; the flag is not used
    cache_control: CacheControl = None


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")],
    part_discriminator(SUPPORTED_BLOCK_TYPES),
]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1)]


class Tool(_Strict):
    # "custom" (or no type) is a client tool; Anthropic's server tools are not served here.
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl = None


class AutoChoice(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class AnyChoice(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class NamedChoice(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class NoneChoice(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[
    Annotated[AutoChoice, Tag("auto")]
    | Annotated[AnyChoice, Tag("any")]
    | Annotated[NamedChoice, Tag("tool")]
    | Annotated[NoneChoice, Tag("none")],
    _one_of(("auto", "any", "tool", "none"), "tool_choice"),
]


class Metadata(_Strict):
    user_id: str | None = None


class MessagesRequest(_Strict):
    model: str | None = None  # Anthropic requires it; here, as on every route, the default
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    max_tokens: int | None = sampling("max_tokens", to_model=False)  # required: checked below
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)  # Anthropic's range
    top_p: float | None = sampling("top_p")
    top_k: int | None = sampling("top_k")
    stream: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None


def parse_messages_request(body: dict[str, Any]) -> MessagesCall:
    """The request checked (400s name the client's paths) and translated."""
    try:
        request = MessagesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body, part_types=SUPPORTED_BLOCK_TYPES) from None
    if request.max_tokens is None:  # required by Anthropic's API, and so here
        raise MISSING_REQUIRED_PARAMETER("max_tokens", path="max_tokens")
    return MessagesCall(request)


# ---- Messages → chat completions -------------------------------------------------------

# The internal request's top-level fields → the Messages fields they came from; the messages
# have a prefix table of their own (MessagesCall.paths).
_RENAMES = (
    ("stop", "stop_sequences"),
    ("tools[*].function.parameters", "tools[*].input_schema"),
    ("tools[*].function", "tools[*]"),
    ("tool_choice.function.name", "tool_choice.name"),
    ("tool_choice.function", "tool_choice"),
    ("parallel_tool_calls", "tool_choice.disable_parallel_tool_use"),
    ("user", "metadata.user_id"),
)


class MessagesCall:
    """One Messages request: the internal request's body and where each of its paths came
    from in the client's body (`paths`)."""

    def __init__(self, request: MessagesRequest) -> None:
        self.request = request
        self._messages: list[dict[str, Any]] = []
        # internal path prefix → the client's: `messages[3].content[0]` → `messages[1].content[2]`
        self._prefixes: dict[str, str] = {}
        self.chat_body = self._chat_body()
        self.paths = ClientPaths(renames=_RENAMES, prefixes=self._prefixes)

    @property
    def stop_sequences(self) -> list[str]:
        return self.request.stop_sequences or []

    def _chat_body(self) -> dict[str, Any]:
        r = self.request
        if r.system is not None:
            self._add_system(r.system)
        for index, message in enumerate(r.messages):
            self._add_message(index, message)
        if r.messages[-1].role == "assistant":
            last = f"messages[{len(r.messages) - 1}]"
            raise UNSUPPORTED_PARAMETER(
                last,
                message=f"'{last}': a final assistant message (an answer to continue) is not "
                "supported; end with a user message.",
            )
        body: dict[str, Any] = {"messages": self._messages, "max_tokens": r.max_tokens}
        for name, value in (
            ("model", r.model),
            ("temperature", r.temperature),
            ("top_p", r.top_p),
            ("top_k", r.top_k),
            ("stop", r.stop_sequences or None),
            ("stream", r.stream),
            ("user", r.metadata.user_id if r.metadata is not None else None),
        ):
            if value is not None:
                body[name] = value
        if r.tools is not None:
            body["tools"] = [_chat_tool(tool) for tool in r.tools]
        if r.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(r.tool_choice)
            if getattr(r.tool_choice, "disable_parallel_tool_use", None):
                body["parallel_tool_calls"] = False
        return body

    def _add(self, message: dict[str, Any], origin: str, inner: dict[str, str]) -> None:
        """Appends an internal message that came from `origin`; `inner`: the paths below it
        (`.content[0]`) that sit elsewhere below the client's."""
        prefix = f"messages[{len(self._messages)}]"
        self._messages.append(message)
        self._prefixes[prefix] = origin
        for below, client in inner.items():
            self._prefixes[prefix + below] = client

    def _add_system(self, system: str | list[TextBlock]) -> None:
        if isinstance(system, str):
            self._add({"role": "system", "content": system}, "system", {".content": "system"})
            return
        parts = [{"type": "text", "text": block.text} for block in system]
        inner = {f".content[{j}]": f"system[{j}]" for j in range(len(system))}
        self._add({"role": "system", "content": parts}, "system", {".content": "system", **inner})

    def _add_message(self, index: int, message: Message) -> None:
        path = f"messages[{index}]"
        if isinstance(message.content, str):
            self._add({"role": message.role, "content": message.content}, path, {})
            return
        allowed = _BLOCKS_OF_ROLE[message.role]
        for j, block in enumerate(message.content):
            if block.type not in allowed:
                where = f"{path}.content[{j}]"
                raise INVALID_VALUE(
                    where,
                    message=f"Invalid value for '{where}': '{block.type}' blocks are not allowed "
                    f"in {message.role} messages (they take "
                    + ", ".join(f"'{kind}'" for kind in allowed)
                    + ").",
                )
        if message.role == "assistant":
            self._add_assistant(path, message.content)
        else:
            self._add_user(path, message.content)

    def _add_assistant(self, path: str, blocks: list[Any]) -> None:
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        inner: dict[str, str] = {}
        for j, block in enumerate(blocks):
            if isinstance(block, ToolUseBlock):
                inner[f".tool_calls[{len(calls)}]"] = f"{path}.content[{j}]"
                arguments = json.dumps(block.input, ensure_ascii=False)
                function = {"name": block.name, "arguments": arguments}
                calls.append({"id": block.id, "type": "function", "function": function})
            else:
                inner[f".content[{len(parts)}]"] = f"{path}.content[{j}]"
                parts.append({"type": "text", "text": block.text})
        message: dict[str, Any] = {"role": "assistant", "content": parts or None}
        if calls:
            message["tool_calls"] = calls
        self._add(message, path, inner)

    def _add_user(self, path: str, blocks: list[Any]) -> None:
        """Each tool_result block is a tool message; the blocks between them, a user message
        (Anthropic puts results first; the order is kept whatever it is)."""
        parts: list[dict[str, Any]] = []
        inner: dict[str, str] = {}

        def flush() -> None:
            if parts:
                self._add({"role": "user", "content": list(parts)}, path, dict(inner))
                parts.clear()
                inner.clear()

        for j, block in enumerate(blocks):
            where = f"{path}.content[{j}]"
            if isinstance(block, ToolResultBlock):
                flush()
                self._add_tool_result(where, block)
            else:
                inner.update(_part_paths(f".content[{len(parts)}]", where))
                parts.append(_chat_part(block))
        flush()

    def _add_tool_result(self, path: str, block: ToolResultBlock) -> None:
        inner = {".content": f"{path}.content", ".tool_call_id": f"{path}.tool_use_id"}
        if isinstance(block.content, list):
            content: Any = [_chat_part(part) for part in block.content]
            for j in range(len(block.content)):
                inner.update(_part_paths(f".content[{j}]", f"{path}.content[{j}]"))
        else:
            content = block.content or ""
        message = {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}
        self._add(message, path, inner)


def _part_paths(internal: str, client: str) -> dict[str, str]:
    """A content part's path and its image's: the chat part's `image_url` is the block's
    `source`."""
    return {internal: client, f"{internal}.image_url": f"{client}.source"}


def _chat_part(block: TextBlock | ImageBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    source = block.source
    if isinstance(source, Base64Source):
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        url = source.url
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, NamedChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# ---- chat results → Messages objects ----------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage_dict(usage: TokenUsage) -> dict[str, Any]:
    """Anthropic's usage: the prompt's tokens (images included) and the answer's; nothing is
    read from or written to a prompt cache."""
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def tool_use_block(call: ToolCall, input: dict[str, Any] | None = None) -> dict[str, Any]:
    """`input`: None for the call's own arguments; `{}` opens a streamed block."""
    arguments = json.loads(call.arguments) if input is None else input
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def _tool_use_call(call: ToolCall) -> ToolCall:
    """The call with an Anthropic id (`toolu_…`), which the client sends back in tool_result."""
    return ToolCall(call.name, call.arguments, _new_id("toolu"))


def stop_reason(finish_reason: str, stop_string: str | None, calls: bool) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_string is not None else "end_turn"


class MessageRenderer:
    """The `message` object and the stream events of one request."""

    def __init__(
        self, call: MessagesCall, model: str, usage: TokenUsage, parse_tool_calls: bool
    ) -> None:
        self.call = call
        self.id = _new_id("msg")
        self.model = model
        self.usage = usage
        self.parse_tool_calls = parse_tool_calls

    def message(
        self,
        content: list[dict[str, Any]],
        stop_reason: str | None,
        stop_sequence: str | None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage_dict(self.usage),
        }

    def _stop_string(self, chunk: GenerationChunk) -> str | None:
        """The stop sequence that ended the answer, when the model says which."""
        stop = chunk.stop_reason
        return stop if stop is not None and stop in self.call.stop_sequences else None

    async def collect(self, chunks: AsyncIterator[GenerationChunk]) -> dict[str, Any]:
        """The `message` of a non-streamed request; fills in the usage."""
        text, finish_reason, stop_string = "", "stop", None
        async for chunk in chunks:
            record_usage(self.usage, chunk)
            text += chunk.text
            if chunk.finish_reason is not None:
                finish_reason, stop_string = chunk.finish_reason, self._stop_string(chunk)
        calls: list[ToolCall] = []
        if self.parse_tool_calls:
            text, calls = split_tool_calls(text)
        calls = [_tool_use_call(call) for call in calls]
        content = [{"type": "text", "text": text}] if text else []
        content += [tool_use_block(call) for call in calls]
        reason = stop_reason(finish_reason, stop_string, bool(calls))
        return self.message(content, reason, stop_string if reason == "stop_sequence" else None)

    async def events(
        self,
        first: GenerationChunk | None,
        rest: AsyncIterator[GenerationChunk],
        request_id: str,
    ) -> AsyncGenerator[bytes, None]:
        """The SSE events of a streamed request, from message_start to message_stop (or an
        `error` event)."""
        if first is not None:
            record_usage(self.usage, first)
        started = self.message([], None, None)
        started["usage"]["output_tokens"] = 0  # the first chunk's tokens come in its delta
        yield event("message_start", message=started)
        yield event("ping")
        blocks = _BlockStream()
        calls = ToolCallStream() if self.parse_tool_calls else None
        finish_reason, stop_string = "stop", None
        chunk = first
        try:
            while chunk is not None:
                if chunk is not first:
                    record_usage(self.usage, chunk)
                if chunk.finish_reason is not None:
                    finish_reason, stop_string = chunk.finish_reason, self._stop_string(chunk)
                pieces = calls.feed(chunk.text) if calls else [("content", chunk.text)]
                for data in blocks.pieces(pieces):
                    yield data
                chunk = await anext(rest, None)
            if calls is not None:
                for data in blocks.pieces(calls.finish()):
                    yield data
        except APIError as exc:
            log.warning("request %s: failed mid-stream: %s %s", request_id, exc.status, exc.message)
            yield event("error", error=error_body(exc, request_id)["error"])
            return
        except Exception:
            log.exception("request %s: failed mid-stream", request_id)
            error = INTERNAL_ERROR(request_id=request_id)
            yield event("error", error=error_body(error, request_id)["error"])
            return
        for data in blocks.close():
            yield data
        reason = stop_reason(finish_reason, stop_string, blocks.calls > 0)
        delta = {
            "stop_reason": reason,
            "stop_sequence": stop_string if reason == "stop_sequence" else None,
        }
        output = {"output_tokens": self.usage.completion_tokens}
        yield event("message_delta", delta=delta, usage=output)
        yield event("message_stop")


def event(kind: str, **fields: Any) -> bytes:
    """`event: <type>` and its JSON data, one line each, as Anthropic sends them."""
    payload = json_bytes({"type": kind, **fields})
    return b"event: " + kind.encode("ascii") + b"\ndata: " + payload + b"\n\n"


class _BlockStream:
    """The content blocks of a stream as they form: a text block is opened by the first text
    and closed by a tool call or the end; each tool call is a block of its own."""

    def __init__(self) -> None:
        self.index = 0  # the next block's
        self.text_open = False
        self.calls = 0

    def pieces(self, pieces: list[tuple[str, Any]]) -> Iterator[bytes]:
        for kind, value in pieces:
            if kind == "call":
                yield from self.close()
                yield from self._call(_tool_use_call(value))
            elif value:
                if not self.text_open:
                    self.text_open = True
                    block = {"type": "text", "text": ""}
                    yield event("content_block_start", index=self.index, content_block=block)
                delta = {"type": "text_delta", "text": value}
                yield event("content_block_delta", index=self.index, delta=delta)

    def close(self) -> Iterator[bytes]:
        """Closes the open text block, if any."""
        if self.text_open:
            self.text_open = False
            yield event("content_block_stop", index=self.index)
            self.index += 1

    def _call(self, call: ToolCall) -> Iterator[bytes]:
        block = tool_use_block(call, input={})
        yield event("content_block_start", index=self.index, content_block=block)
        delta = {"type": "input_json_delta", "partial_json": call.arguments}
        yield event("content_block_delta", index=self.index, delta=delta)
        yield event("content_block_stop", index=self.index)
        self.index += 1
        self.calls += 1
