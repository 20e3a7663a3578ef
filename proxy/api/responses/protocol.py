"""OpenAI's Responses API (`POST /v1/responses`), stateless, on the chat-completions path.

A Responses request is checked here (strict pydantic, as chat), then translated into the
internal request (the chat-completions shape) with the paths its fields came from, which runs
through the shared request path unchanged (proxy/request/: parse, limits, media, structured
output, the backend, metrics). The model's chunks come back
as a `response` object, or as Responses' typed SSE events:

    response.created, response.in_progress,
    per output item: response.output_item.added,
        message:       response.content_part.added, response.output_text.delta...,
                       response.output_text.done, response.content_part.done
        function_call: response.function_call_arguments.delta, ...arguments.done
    response.output_item.done, ...,
    response.completed | response.incomplete (cut by max_output_tokens) | response.failed

With `store` (OpenAI's default) the response is kept (proxy/api/responses/routes.py,
proxy/state/responses.py): the object rendered here is what `GET /v1/responses/{id}` returns,
and a later request continues it with `previous_response_id`: the stored turns come back as
input items before the request's own (`ResponsesCall(request, history)`), their errors naming
`previous_response_id`. `conversation` (the Conversations API) is a 400. Errors of the shared
path name the client's Responses path where they are made (`input[0].content[1].image_url`, not
`messages[1]...`: proxy/request/paths.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ...error_catalogue import (
    INTERNAL_ERROR,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    UNSUPPORTED_PARAMETER,
    APIError,
)
from ...request.paths import ClientPaths
from ...request.schema import (
    BaseModel,
    PriorityName,
    part_discriminator,
    sampling,
    validation_api_error,
)
from ...request.sse import sse_event
from ...request.tool_calls import ToolCall, ToolCallStream, split_tool_calls
from ...transport.backend import GenerationChunk
from ...transport.contract import REPETITION_GUARD, VLLM_EXTRAS
from ..chat.render import TokenUsage, record_usage

log = logging.getLogger("proxy")

# Every answer of /v1/responses says whether the response was kept (`store`).
STORED_HEADER = "X-Response-Stored"
SUPPORTED_PART_TYPES = ("input_text", "input_image", "output_text")
SUPPORTED_ITEM_TYPES = ("message", "function_call", "function_call_output")
# Where errors about a stored conversation's turns point: they came from no field of the body.
HISTORY_PATH = "previous_response_id"

# ---- the request -----------------------------------------------------------------------


class InputText(BaseModel):
    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    """Assistant text in the history (`annotations`, `logprobs` are not used)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["output_text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = None  # a data: URL or an http(s) URL
    # an uploaded file (the Files API), resolved by the route: conversation.resolve_file_images
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


InputPart = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[InputImage, Tag("input_image")]
    | Annotated[OutputText, Tag("output_text")],
    part_discriminator(SUPPORTED_PART_TYPES),
]


class MessageItem(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class FunctionCallItem(BaseModel):
    """A call the model made in an earlier turn (the client keeps the history)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function_call_output"]
    call_id: str
    output: str


def _item_type(item: Any) -> str | None:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return (kind or "message") if (kind or "message") in SUPPORTED_ITEM_TYPES else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="unsupported_input_item",
        custom_error_message="Unsupported input item type; this server accepts "
        + ", ".join(f"'{kind}'" for kind in SUPPORTED_ITEM_TYPES)
        + " items",
    ),
]


class FunctionTool(BaseModel):
    """Responses' flat function tool: `{"type": "function", "name", "parameters", ...}`."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _name_and_schema_with_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise ValueError("'name' and 'schema' are required with type 'json_schema'")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = sampling("max_tokens", to_model=False)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512.
    metadata: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None
    ) = Field(default=None, max_length=16)
    user: str | None = None
    priority: PriorityName | None = None  # as chat completions' (docs/engine.md)
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None

    @property
    def ignored_fields(self) -> list[str]:
        ignored = [name for name in self.model_extra or {} if name not in SAMPLING_EXTRAS]
        if self.text is not None:
            ignored += [f"text.{name}" for name in self.text.model_extra or {}]
        if isinstance(self.input, list):
            for index, item in enumerate(self.input):
                ignored += [f"input[{index}].{name}" for name in item.model_extra or {}]
        return ignored


# vLLM's extra sampling fields, which Responses takes as extra body fields as vLLM does: they
# go to the internal (chat) request as they are, checked there, and errors name them as sent.
# Not prompt_logprobs: a Response has no place for them.
SAMPLING_EXTRAS = (
    *(name for name in VLLM_EXTRAS if name != "prompt_logprobs"),
    REPETITION_GUARD,
)


def validate_responses_request(body: dict[str, Any]) -> ResponsesRequest:
    """The request checked (400 envelopes as chat's, naming Responses paths)."""
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body, part_types=SUPPORTED_PART_TYPES) from None
    if request.conversation is not None:
        raise UNSUPPORTED_PARAMETER(
            "conversation",
            message="'conversation' is not supported: this server has no Conversations API; "
            "continue a conversation with 'previous_response_id'.",
        )
    if request.background:
        if request.store is False:
            raise INVALID_VALUE(
                "store",
                message="Invalid value for 'store': a background response is stored to be "
                "polled, so 'background' requires 'store' to be true.",
            )
        if request.stream:
            raise UNSUPPORTED_PARAMETER(
                "stream",
                message="'stream' with 'background' is not supported: create the background "
                "response without 'stream' and poll GET /v1/responses/{id}.",
            )
    return request


def parse_responses_request(body: dict[str, Any]) -> ResponsesCall:
    """The request checked and translated, without a stored conversation."""
    return ResponsesCall(validate_responses_request(body))


_HISTORY_ITEMS: TypeAdapter[list[Any]] = TypeAdapter(list[InputItem])


def history_items(items: list[dict[str, Any]]) -> list[Any]:
    """Stored items (earlier turns' input and output, images as data: URLs) as input items."""
    return _HISTORY_ITEMS.validate_python(items)


# ---- Responses → chat completions ------------------------------------------------------

# The internal request's top-level fields → the Responses fields they came from.
_RENAMES = (
    ("max_tokens", "max_output_tokens"),
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("tool_choice.function", "tool_choice"),
    ("tools[*].function", "tools[*]"),
    ("messages", "input"),
)


class ResponsesCall:
    """One Responses request: the internal request's body, where each of its fields came from
    in the client's body (`paths`), and the rendering of its response."""

    def __init__(self, request: ResponsesRequest, history: Sequence[Any] = ()) -> None:
        self.request = request
        # Earlier turns of a stored conversation (`history_items`), before the request's input.
        self.history = history
        # Whether the response is kept; the route says false where the proxy keeps no state.
        self.store = request.store is not False
        # chat message index → (the Responses path it came from, whether the chat path's rest
        # below the message (`.content[1].image_url`) is the same below that path)
        self._origins: list[tuple[str, bool]] = []
        self.chat_body = self._chat_body()
        self.paths = ClientPaths(tuple(self._origins), _RENAMES)

    @property
    def user(self) -> str | None:
        return self.request.user

    @property
    def ignored_fields(self) -> list[str]:
        return self.request.ignored_fields

    @property
    def is_stream(self) -> bool:
        return bool(self.request.stream)

    def _chat_body(self) -> dict[str, Any]:
        r = self.request
        messages: list[dict[str, Any]] = []
        if r.instructions is not None:
            messages.append({"role": "system", "content": r.instructions})
            self._origins.append(("instructions", False))
        for item in self.history:
            self._add_item(messages, HISTORY_PATH, item, below=False)
        if isinstance(r.input, str):
            messages.append({"role": "user", "content": r.input})
            self._origins.append(("input", False))
        else:
            for index, item in enumerate(r.input):
                self._add_item(messages, f"input[{index}]", item)
        body: dict[str, Any] = {"messages": messages}
        if r.model is not None:
            body["model"] = r.model
        for name, value in (
            ("max_tokens", r.max_output_tokens),
            ("temperature", r.temperature),
            ("top_p", r.top_p),
            ("stream", r.stream),
            ("parallel_tool_calls", r.parallel_tool_calls),
            ("user", r.user),
            ("priority", r.priority),
        ):
            if value is not None:
                body[name] = value
        extra = r.model_extra or {}
        body.update({name: extra[name] for name in SAMPLING_EXTRAS if name in extra})
        fmt = r.text.format if r.text is not None else None
        if fmt is not None:
            body["response_format"] = _chat_response_format(fmt)
        if r.tools is not None:
            body["tools"] = [_chat_tool(tool) for tool in r.tools]
        if isinstance(r.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": r.tool_choice.name}}
        elif r.tool_choice is not None:
            body["tool_choice"] = r.tool_choice
        return body

    def _add_item(
        self, messages: list[dict[str, Any]], path: str, item: Any, *, below: bool = True
    ) -> None:
        """`below`: the item's own fields are where the client sent them (not an earlier turn,
        whose errors all point at `path`)."""
        if isinstance(item, MessageItem):
            if isinstance(item.content, str):
                content: Any = item.content
            else:
                content = [
                    _chat_part(part, f"{path}.content[{j}]") for j, part in enumerate(item.content)
                ]
            messages.append({"role": item.role, "content": content})
            self._origins.append((path, below))
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # consecutive calls: one assistant turn
                return
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            self._origins.append((path, False))
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            self._origins.append((f"{path}.output" if below else path, False))

    # ---- the response ------------------------------------------------------------------

    def renderer(self, model: str, usage: TokenUsage, parse_tool_calls: bool) -> ResponseRenderer:
        return ResponseRenderer(self, model, usage, parse_tool_calls)


def _chat_part(part: Any, path: str) -> dict[str, Any]:
    if isinstance(part, InputImage):
        if part.image_url is None:  # a file_id is resolved to a data: URL before this
            raise MISSING_REQUIRED_PARAMETER(f"{path}.image_url", path=f"{path}.image_url")
        image: dict[str, Any] = {"url": part.image_url}
        if part.detail is not None:
            # "original" asks for the image as sent: the largest budget the server grants.
            image["detail"] = "high" if part.detail == "original" else part.detail
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": part.text}


def _chat_response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.json_schema}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = tool.model_dump(exclude_none=True, exclude={"type"})
    return {"type": "function", "function": function}


# ---- chat results → Responses objects ---------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_dict(usage: TokenUsage) -> dict[str, Any]:
    """Responses' usage: chat's counts under their Responses names (image and video tokens
    among the input tokens when the model reports them, as chat's prompt_tokens_details)."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": usage.prompt_details(),
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [_text_part(text)],
    }


def _call_item(item_id: str, call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
    }


class ResponseRenderer:
    """The `response` object and the stream events of one request."""

    def __init__(
        self, call: ResponsesCall, model: str, usage: TokenUsage, parse_tool_calls: bool
    ) -> None:
        self.call = call
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.usage = usage
        self.parse_tool_calls = parse_tool_calls

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        finished: bool = True,
        error: APIError | None = None,
    ) -> dict[str, Any]:
        r = self.call.request
        fmt = r.text.format if r.text is not None else None
        tool_choice = r.tool_choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": bool(r.background),
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None if error is None else {"code": error.code, "message": error.message},
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id,
            "reasoning": None,
            "store": self.call.store,
            "temperature": r.temperature,
            "text": {
                "format": (
                    fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
                )
            },
            "tool_choice": (
                tool_choice.model_dump() if isinstance(tool_choice, FunctionChoice) else tool_choice
            ),
            "tools": [tool.model_dump(exclude_none=True) for tool in r.tools or []],
            "top_p": r.top_p,
            "truncation": "disabled",
            "usage": usage_dict(self.usage) if finished else None,
            "user": r.user,
            "metadata": r.metadata or {},
        }

    async def collect(self, chunks: AsyncIterator[GenerationChunk]) -> dict[str, Any]:
        """The `response` object of a non-streamed request; fills in the usage."""
        text, finish_reason = "", "stop"
        async for chunk in chunks:
            record_usage(self.usage, chunk)
            text += chunk.text
            finish_reason = chunk.finish_reason or finish_reason
        calls: list[ToolCall] = []
        if self.parse_tool_calls:
            text, calls = split_tool_calls(text)
        status = "incomplete" if finish_reason == "length" else "completed"
        output = []
        if text or not calls:
            output.append(_message_item(_new_id("msg"), text, status))
        output += [_call_item(_new_id("fc"), call, call.arguments, "completed") for call in calls]
        return self.response(status, output)

    async def events(
        self,
        first: GenerationChunk | None,
        rest: AsyncIterator[GenerationChunk],
        request_id: str,
        on_done: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The SSE events of a streamed request, ending with its terminal event. `on_done`
        gets the final response object before the terminal event goes out (the route stores
        it, so the id works as `previous_response_id` once the client has seen the end); if
        it fails, the terminal event is `response.failed` with an internal error."""
        stream = _EventStream(self)
        yield stream.event(
            "response.created", response=self.response("in_progress", [], finished=False)
        )
        yield stream.event(
            "response.in_progress", response=self.response("in_progress", [], finished=False)
        )
        calls = ToolCallStream() if self.parse_tool_calls else None
        finish_reason = "stop"
        final: dict[str, Any]
        try:
            async for chunk in _prepend(first, rest):
                record_usage(self.usage, chunk)
                finish_reason = chunk.finish_reason or finish_reason
                pieces = calls.feed(chunk.text) if calls else [("content", chunk.text)]
                for event in stream.pieces(pieces):
                    yield event
            if calls is not None:
                for event in stream.pieces(calls.finish()):
                    yield event
        except APIError as exc:
            log.warning("request %s: failed mid-stream: %s %s", request_id, exc.status, exc.message)
            final = stream.failed_response(exc)
        except Exception:
            log.exception("request %s: failed mid-stream", request_id)
            final = stream.failed_response(INTERNAL_ERROR(request_id=request_id))
        else:
            status = "incomplete" if finish_reason == "length" else "completed"
            for event in stream.finish_items(status):
                yield event
            final = self.response(status, stream.items)
        if on_done is not None:
            try:
                await on_done(final)
            except Exception:
                log.exception("request %s: the response could not be stored", request_id)
                final = stream.failed_response(INTERNAL_ERROR(request_id=request_id))
        yield stream.terminal(final)


class _EventStream:
    """The output items of a stream as they form, and their events, numbered."""

    def __init__(self, renderer: ResponseRenderer) -> None:
        self.renderer = renderer
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # finished items, in output order
        self._message: dict[str, Any] | None = None  # the open message item
        self._text = ""

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return b"event: " + kind.encode("ascii") + b"\n" + sse_event(payload)

    def pieces(self, pieces: list[tuple[str, Any]]) -> Iterator[bytes]:
        for kind, value in pieces:
            if kind == "call":
                yield from self._close_message("completed")
                yield from self._call(value)
            elif value:
                yield from self._text_delta(value)

    def _text_delta(self, text: str) -> Iterator[bytes]:
        if self._message is None:
            self._message = _message_item(_new_id("msg"), None, "in_progress")
            self._text = ""
            yield self.event(
                "response.output_item.added", output_index=len(self.items), item=self._message
            )
            yield self.event("response.content_part.added", **self._where(), part=_text_part(""))
        self._text += text
        yield self.event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def _where(self) -> dict[str, Any]:
        assert self._message is not None
        return {"item_id": self._message["id"], "output_index": len(self.items), "content_index": 0}

    def _close_message(self, status: str) -> Iterator[bytes]:
        if self._message is None:
            return
        where = self._where()
        yield self.event("response.output_text.done", **where, text=self._text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=_text_part(self._text))
        item = _message_item(self._message["id"], self._text, status)
        yield self.event("response.output_item.done", output_index=len(self.items), item=item)
        self.items.append(item)
        self._message = None

    def _call(self, call: ToolCall) -> Iterator[bytes]:
        item_id, index = _new_id("fc"), len(self.items)
        where = {"item_id": item_id, "output_index": index}
        added = _call_item(item_id, call, "", "in_progress")
        yield self.event("response.output_item.added", output_index=index, item=added)
        yield self.event("response.function_call_arguments.delta", **where, delta=call.arguments)
        yield self.event(
            "response.function_call_arguments.done",
            **where,
            name=call.name,
            arguments=call.arguments,
        )
        item = _call_item(item_id, call, call.arguments, "completed")
        yield self.event("response.output_item.done", output_index=index, item=item)
        self.items.append(item)

    def finish_items(self, status: str) -> Iterator[bytes]:
        """The events that close the output items, before the terminal event."""
        if not self.items and self._message is None:
            yield from self._text_delta_free_message()
        yield from self._close_message(status)

    def _text_delta_free_message(self) -> Iterator[bytes]:
        """The model said nothing: an empty message, as the non-streamed response has."""
        self._message = _message_item(_new_id("msg"), None, "in_progress")
        self._text = ""
        yield self.event("response.output_item.added", output_index=0, item=self._message)
        yield self.event("response.content_part.added", **self._where(), part=_text_part(""))

    def failed_response(self, error: APIError) -> dict[str, Any]:
        """The response object of a stream that failed: the output so far, its error."""
        output = list(self.items)
        if self._message is not None:
            output.append(_message_item(self._message["id"], self._text, "incomplete"))
        return self.renderer.response("failed", output, error=error)

    def terminal(self, response: dict[str, Any]) -> bytes:
        """`response.completed`, `.incomplete` or `.failed`, by the response's status."""
        return self.event(f"response.{response['status']}", response=response)


async def _prepend(
    first: GenerationChunk | None, rest: AsyncIterator[GenerationChunk]
) -> AsyncIterator[GenerationChunk]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk
