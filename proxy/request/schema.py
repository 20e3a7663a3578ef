"""The chat-completions request body, validated with pydantic.

Unknown top-level fields are accepted, as OpenAI-compatible servers do (clients send fields
this server has no use for, such as `service_tier` or `metadata`, and must not get 422s); they
are not silently dropped either: the app names them in an `X-Ignored-Fields` header and the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic import BaseModel as _PydanticModel
from pydantic_core import PydanticCustomError

from ..error_catalogue import (
    INVALID_TYPE,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    UNSUPPORTED_CONTENT_TYPE,
    APIError,
)
from ..media.images import IMAGE
from ..media.kinds import MediaKind
from ..media.videos import VIDEO
from ..transport.contract import (
    DEFAULT_PRIORITY,
    MAX_STOP_STRINGS,
    NUMBER,
    REPETITION_GUARD_FIELDS,
    Priority,
)
from ..transport.contract import SAMPLING_FIELDS as SAMPLING_RULES
from .paths import CHAT_PATHS, ClientPaths

SUPPORTED_PART_TYPES = ("text", "image_url", "video_url")
# The `priority` field's values: the contract's scheduling classes by name (a JSON string, so a
# Literal: strict mode takes only enum instances for an Enum field).
PriorityName = Literal[tuple(priority.value for priority in Priority)]


class BaseModel(_PydanticModel):
    """Strict, as OpenAI's API: `"stream": "yes"` or `"max_tokens": "5"` is a 400, not coerced
    (integers still count as numbers)."""

    model_config = ConfigDict(strict=True)


# pydantic's error types for a value of the wrong JSON type → OpenAI's word for the type.
_TYPE_ERRORS = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "an array",
    "model_type": "an object",
    "dict_type": "an object",
}


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    # Per-image pixel bounds (an extension, as vLLM's): they win over the request's.
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """A content part pointing at media of one kind (proxy/media/kinds.py); its URL object is the
    field named like the part type (`image_url`)."""

    kind: ClassVar[MediaKind]

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        # Some clients send `"image_url": "data:..."` instead of `{"url": "data:..."}`.
        field = cls.kind.part_type
        if isinstance(value, dict) and isinstance(value.get(field), str):
            return {**value, field: {"url": value[field]}}
        return value

    @property
    def source(self) -> Any:
        """The URL object (`image_url`, `video_url`): `url` and the kind's budget fields."""
        return getattr(self, self.kind.part_type)


class ImagePart(MediaPart):
    kind: ClassVar[MediaKind] = IMAGE
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str
    # Sampling and resizing (vLLM's and qwen-vl-utils' names), within the server's bounds.
    fps: float | None = Field(default=None, gt=0)
    max_frames: int | None = Field(default=None, ge=2)
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    total_pixels: int | None = Field(default=None, ge=1)


class VideoPart(MediaPart):
    kind: ClassVar[MediaKind] = VIDEO
    type: Literal["video_url"]
    video_url: VideoURL


def part_discriminator(supported: tuple[str, ...]) -> Discriminator:
    """Picks a content part's model by its `type`; a part of any other type (input_audio,
    file, ...) fails with an error type `validation_api_error` turns into a 400 naming it."""

    def part_type(part: Any) -> str | None:
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        return kind if kind in supported else None

    return Discriminator(
        part_type,
        custom_error_type="unsupported_content_type",
        custom_error_message="Unsupported content part type",
    )


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image_url")]
    | Annotated[VideoPart, Tag("video_url")],
    part_discriminator(SUPPORTED_PART_TYPES),
]


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    # `developer` is OpenAI's newer name for `system`; `tool` carries tool results.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required; null only on an assistant turn that carried tool calls instead (as OpenAI).
    content: str | list[ContentPart] | None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only on an assistant message with tool_calls")
        return self


class FunctionDefinition(BaseModel):
    # OpenAI's rule for function names.
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = (
        None  # a JSON Schema (checked in proxy/request/structured.py)
    )
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool | None = None
    # vLLM's: usage (the counts so far) on every chunk; it implies include_usage here
    continuous_usage_stats: bool | None = None


class JSONSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow pydantic's BaseModel.schema
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


# Marks a field the model takes as it is, in `sampling_parameters` under the same name
# (proxy/request/translate.py), so a new sampling field is a row of the contract's table, one
# line here and its use in the model.
TO_MODEL = {"to_model": True}


def sampling(name: str, to_model: bool = True, rules: dict = SAMPLING_RULES) -> Any:
    """A sampling field with the contract's range for `name` (the model checks the same row),
    so out-of-range numbers such as 2**64 are refused here, before any image is fetched. A
    field of another kind (a boolean, token ids, a token map) takes its rule from `checked`."""
    rule = rules[name]
    extra = TO_MODEL if to_model else None
    if rule.kind != NUMBER:
        return Field(default=None, json_schema_extra=extra)
    low = {"gt": rule.low} if rule.low_open else {"ge": rule.low}
    return Field(default=None, le=rule.high, json_schema_extra=extra, **low)


def checked(name: str) -> AfterValidator:
    """The contract's rule for the sampling field `name` (lengths, keys, ranges of a list or
    map), applied after pydantic checked the JSON types; a failure names the field."""
    rule = SAMPLING_RULES[name]

    def check(value: Any) -> Any:
        problem = rule.problem(value)
        if problem:
            raise PydanticCustomError("sampling_rule", problem)
        return value

    return AfterValidator(check)


class RepetitionGuard(BaseModel):
    """The n-gram loop guard (contract.REPETITION_GUARD): stop once the last `ngram` tokens
    have come `max_repeats` + 1 times in a row; ngram 0 turns the server's default off."""

    ngram: int = Field(
        ge=REPETITION_GUARD_FIELDS["ngram"].low, le=REPETITION_GUARD_FIELDS["ngram"].high
    )
    max_repeats: int | None = sampling("max_repeats", to_model=False, rules=REPETITION_GUARD_FIELDS)

    @model_validator(mode="after")
    def _repeats_with_an_ngram(self) -> RepetitionGuard:
        if self.ngram and self.max_repeats is None:
            raise PydanticCustomError("guard_rule", "max_repeats is required with a non-zero ngram")
        return self


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = sampling("max_tokens", to_model=False)
    max_completion_tokens: int | None = sampling("max_tokens", to_model=False)
    temperature: float | None = sampling("temperature")
    top_p: float | None = sampling("top_p")
    top_k: int | None = sampling("top_k")
    repetition_penalty: float | None = sampling("repetition_penalty")
    presence_penalty: float | None = sampling("presence_penalty")
    frequency_penalty: float | None = sampling("frequency_penalty")
    seed: int | None = sampling("seed")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    # Choices per request; the model refuses more than its `max_choices` parameter allows.
    n: int | None = sampling("n", to_model=False)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = sampling("top_logprobs", to_model=False)
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling fields (the contract's rows; docs/engine.md "Sampling")
    min_tokens: int | None = sampling("min_tokens")
    ignore_eos: bool | None = sampling("ignore_eos")
    stop_token_ids: Annotated[list[int], checked("stop_token_ids")] | None = sampling(
        "stop_token_ids"
    )
    logit_bias: Annotated[dict[str, float], checked("logit_bias")] | None = sampling("logit_bias")
    min_p: float | None = sampling("min_p")
    include_stop_str_in_output: bool | None = sampling("include_stop_str_in_output")
    skip_special_tokens: bool | None = sampling("skip_special_tokens")
    prompt_logprobs: int | None = sampling("prompt_logprobs")
    # The n-gram loop guard (an extension; the model's repetition_guard_* parameters are the
    # default); translated into sampling_parameters by proxy/request/translate.py.
    repetition_guard: RepetitionGuard | None = None
    # Per-request stage timings in the response (an extension; --timings: always).
    timings: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # The request's scheduling class in the model (an extension; docs/engine.md "Priority
    # classes"). The Batch API imposes `batch` on its lines through start_generation.
    priority: PriorityName | None = None
    # Pixel bounds for every image of the request (see proxy/media/pixels.py).
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)

    # Where each field sits in the client's body (proxy/request/paths.py): every error names
    # the client's path through it. Set by parse_chat_request.
    _paths: ClientPaths = PrivateAttr(default=CHAT_PATHS)
    # A prompt the model takes as it is instead of `messages` (RawPromptRequest).
    _prompt: RawPrompt | None = PrivateAttr(default=None)

    @property
    def paths(self) -> ClientPaths:
        return self._paths

    @property
    def prompt(self) -> RawPrompt | None:
        return self._prompt

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        options = self.stream_options
        return bool(options and (options.include_usage or options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def token_limit(self) -> int | None:
        # `max_completion_tokens` replaced `max_tokens` in OpenAI's API; the newer name wins.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def priority_class(self) -> Priority:
        return DEFAULT_PRIORITY if self.priority is None else Priority(self.priority)

    @property
    def ignored_fields(self) -> list[str]:
        """Fields the client sent that this server does not use: top-level ones by name in
        body order, then message-level ones by path (`messages[2].name`)."""
        ignored = list(self.model_extra or {})
        for index, message in enumerate(self.messages):
            ignored += [f"messages[{index}].{name}" for name in message.model_extra or {}]
        return ignored


@dataclass(frozen=True)
class RawPrompt:
    """A prompt the model takes as it is, without its chat template (legacy completions,
    /tokenize's `prompt`): text (`text_input`) or token ids (`input_ids`); `param`: the
    client's path to it, which the model's errors about it name."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    param: str = "prompt"


class RawPromptRequest(ChatCompletionRequest):
    """The internal request of a raw prompt: every field of the chat body but `messages`,
    which it has none of (the prompt is `prompt`)."""

    messages: list[ChatMessage] = Field(default_factory=list, max_length=0)


SAMPLING_FIELDS = tuple(
    name
    for name, field in ChatCompletionRequest.model_fields.items()
    if field.json_schema_extra == TO_MODEL
)


def parse_chat_request(
    body: dict[str, Any], paths: ClientPaths = CHAT_PATHS, prompt: RawPrompt | None = None
) -> ChatCompletionRequest:
    """The internal request; `paths`: where its fields sit in the client's body, when another
    API surface built `body` from its own; `prompt`: a raw prompt, which `body` then has
    instead of `messages`."""
    model = ChatCompletionRequest if prompt is None else RawPromptRequest
    try:
        chat = model.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body, paths=paths) from None
    chat._paths = paths
    chat._prompt = prompt
    if chat.top_logprobs is not None and not chat.logprobs:
        param = paths("top_logprobs")
        raise INVALID_VALUE(
            param, message=f"Invalid value for '{param}': it requires 'logprobs' to be true."
        )
    if chat.prompt_logprobs is not None and chat.is_stream:  # as vLLM
        param = paths("prompt_logprobs")
        raise INVALID_VALUE(
            param, message=f"Invalid value for '{param}': it is not available when streaming."
        )
    limit = chat.token_limit
    if chat.min_tokens is not None and limit is not None and chat.min_tokens > limit:
        param = paths("min_tokens")
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': it must be at most max_tokens ({limit}).",
        )
    return chat


def validation_api_error(
    exc: ValidationError,
    body: Any,
    *,
    part_types: tuple[str, ...] = SUPPORTED_PART_TYPES,
    paths: ClientPaths = CHAT_PATHS,
) -> APIError:
    """The most specific pydantic error as a 400 envelope, its input position as `param`
    (the client's, through `paths`); `part_types`: the content part types the message of an
    unsupported one names."""
    candidates = [(_input_path(err["loc"], body, err["type"]), err) for err in exc.errors()]
    path, err = max(candidates, key=lambda item: len(item[0]))  # max keeps the first of ties
    param = paths(format_param(path))
    if err["type"] == "unsupported_content_type":
        return _content_part_error(err["input"], param, part_types)
    at_path = [e for p, e in candidates if p == path]
    if all(e["type"] in _TYPE_ERRORS for e in at_path):
        expected = " or ".join(dict.fromkeys(_TYPE_ERRORS[e["type"]] for e in at_path))
        message = (
            f"Invalid type for '{param}': expected {expected}, "
            f"but got {_json_type(err['input'])} instead."
        )
        return INVALID_TYPE(param or None, message=message)
    if err["type"] == "missing":
        return MISSING_REQUIRED_PARAMETER(param or None, path=param)
    # A value that fits none of a union's members fails once per member; name them all.
    reasons = dict.fromkeys(e["msg"] for p, e in candidates if p == path)
    message = f"Invalid value for '{param}': {' or '.join(reasons)}."
    return INVALID_VALUE(param or None, message=message)


def _json_type(value: Any) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else "another type"


def _content_part_error(part: Any, param: str, part_types: tuple[str, ...]) -> APIError:
    supported = ", ".join(f"'{kind}'" for kind in part_types)
    if not isinstance(part, dict):
        message = f"Invalid value for '{param}': a content part must be an object."
        return INVALID_VALUE(param, message=message)
    if "type" not in part:
        return MISSING_REQUIRED_PARAMETER(f"{param}.type", path=f"{param}.type")
    kind = str(part["type"])[:40]
    return UNSUPPORTED_CONTENT_TYPE(param, kind=kind, path=param, supported=supported)


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
