"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes, answered by the model.

Tokenize takes chat `messages` (with image and video parts, `detail` and pixel budgets, and
`tools`, as chat completions takes them) or a raw `prompt`. The messages go through the shared
request path as a chat completion's would (checks, translation, media fetched and checked), and
the model renders and tokenizes them exactly as it would to generate (qwen_vl_backend/request/
tokenize.py), with no generation and no KV slot: `count` is the `prompt_tokens` the same chat
completion reports. The answer adds `parts` to vLLM's: the prompt in order, text runs and each
image or video with its tokens and resized size.

    {"count", "max_model_len", "tokens", "token_strs" (when asked), "parts": [
        {"type": "text", "tokens"}, {"type": "image", "tokens", "width", "height"},
        {"type": "video", "tokens", "width", "height", "frames"}, ...]}

Detokenize takes `tokens` and answers `{"prompt"}`: their text, special tokens included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from aiohttp import web
from pydantic import ConfigDict, Field, ValidationError

from ...error_catalogue import (
    INTERNAL_ERROR,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    UNSUPPORTED_PARAMETER,
)
from ...errors import REQUEST_ID_KEY, json_dumps
from ...request.generation import note_request_fields, read_json_object, resolve_model, run_task
from ...request.paths import ClientPaths
from ...request.schema import BaseModel, RawPrompt, parse_chat_request, validation_api_error
from ...transport.backend import DEFAULT_PROMPT_OPTIONS, PromptOptions
from ...transport.contract import INT32_MAX, Task, TokenizeResult

# Fields of these routes that are not the internal (chat) request's.
_TOKENIZE_FIELDS = (
    "prompt",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "return_token_strs",
)
# The model names its own inputs; the client sent these fields.
_PROMPT_PATHS = ClientPaths(renames=(("text_input", "prompt"), ("messages", "prompt")))
_DETOKENIZE_PATHS = ClientPaths(renames=(("input_ids", "tokens"),))

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class TokenizeRequest(BaseModel):
    """The fields of a tokenize body beside the chat request's (vLLM's names and defaults)."""

    model_config = ConfigDict(strict=True, extra="allow")

    prompt: str | None = None
    messages: list[Any] | None = None  # checked as chat completions checks them
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's defaults: false for messages (the template writes them), true for a prompt
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    tokens: list[TokenId]


@dataclass
class _Fields:
    """What note_request_fields logs: the user and the fields this route does not use."""

    user: str | None = None
    ignored_fields: list[str] = field(default_factory=list)


async def tokenize(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    try:
        fields = TokenizeRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body) from None
    if fields.continue_final_message:
        raise UNSUPPORTED_PARAMETER(
            "continue_final_message",
            message="'continue_final_message' is not supported; tokenize the conversation "
            "with add_generation_prompt false instead.",
        )
    if fields.prompt is not None and fields.messages is not None:
        raise INVALID_VALUE(
            "prompt", message="Invalid value for 'prompt': send either 'prompt' or 'messages'."
        )
    if fields.prompt is None and fields.messages is None:
        raise MISSING_REQUIRED_PARAMETER.with_message(
            "Missing required parameter: 'messages' (or 'prompt').", "messages"
        )
    if fields.messages is not None:
        chat_body = {name: value for name, value in body.items() if name not in _TOKENIZE_FIELDS}
        chat = parse_chat_request(chat_body)
        noted: Any = chat
    else:
        model = {"model": body["model"]} if "model" in body else {}
        chat = parse_chat_request(model, _PROMPT_PATHS, RawPrompt(text=fields.prompt))
        ignored = [name for name in body if name not in (*_TOKENIZE_FIELDS, "model")]
        noted = _Fields(user=None, ignored_fields=ignored)
    note_request_fields(request, noted)
    options = PromptOptions(
        add_generation_prompt=fields.add_generation_prompt,
        add_special_tokens=fields.add_special_tokens,
        return_token_strs=fields.return_token_strs,
    )
    _, answer = await run_task(request, chat, Task.TOKENIZE, options)
    result = TokenizeResult.decode(answer)
    if result is None:  # a contract bug in the model
        raise INTERNAL_ERROR(request_id=request[REQUEST_ID_KEY])
    return web.json_response(tokenize_response(result), dumps=json_dumps)


def tokenize_response(result: TokenizeResult) -> dict[str, Any]:
    """vLLM's TokenizeResponse, and the prompt's parts (their unset sizes left out)."""
    response: dict[str, Any] = {
        "count": result.count,
        "max_model_len": result.max_model_len,
        "tokens": result.tokens,
    }
    if result.token_strs is not None:
        response["token_strs"] = result.token_strs
    response["parts"] = [
        {name: value for name, value in asdict(part).items() if value is not None}
        for part in result.parts
    ]
    return response


async def detokenize(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    try:
        fields = DetokenizeRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body) from None
    ignored = [name for name in body if name not in ("model", "tokens")]
    note_request_fields(request, _Fields(ignored_fields=ignored))
    if not fields.tokens:  # no ids, no text (Triton takes no empty input)
        await resolve_model(request.app, fields.model)
        return web.json_response({"prompt": ""})
    model = {"model": fields.model} if fields.model is not None else {}
    prompt = RawPrompt(token_ids=tuple(fields.tokens), param="tokens")
    chat = parse_chat_request(model, _DETOKENIZE_PATHS, prompt)
    _, text = await run_task(request, chat, Task.DETOKENIZE, DEFAULT_PROMPT_OPTIONS)
    return web.json_response({"prompt": text}, dumps=json_dumps)
