"""The legacy completions request (`POST /v1/completions`) and its `text_completion` output.

A completions body is checked here for its own fields (`prompt`, `echo`, the integer
`logprobs`, `best_of`, `suffix`); the rest are the internal request's own fields under the
same names (sampling, `stop`, `stream`, `stream_options`, `user`, ...), checked by it. Each
prompt becomes one internal request with a raw prompt (no chat template: proxy/request/
schema.py `RawPrompt`) and one generation; choices are numbered as OpenAI numbers them, prompt
by prompt: choice `j` of prompt `p` is `index` p * n + j.

`best_of` generates that many choices per prompt and keeps the `n` of highest mean token
logprob (OpenAI's "highest log probability per token"), best first; the model is asked for the
chosen tokens' logprobs to rank them. Usage counts every generated token, as OpenAI bills.

`logprobs` (0 to 5) is the legacy shape: `tokens`, `token_logprobs`, `top_logprobs` (the
`logprobs` most likely tokens and the chosen one, by token text) and `text_offset` (each
token's character offset in the choice's text). With `echo` the prompt comes first in the
text, and with `logprobs` its tokens too (the model's prompt logprobs; the first token has
none, as OpenAI writes it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, ValidationError

from ...error_catalogue import INVALID_TYPE, INVALID_VALUE, UNSUPPORTED_PARAMETER, APIError
from ...request.paths import ClientPaths
from ...request.schema import (
    BaseModel,
    ChatCompletionRequest,
    RawPrompt,
    parse_chat_request,
    sampling,
    validation_api_error,
)
from ...transport.contract import INT32_MAX
from ..chat.render import CompletionIdentity as ChatIdentity

# OpenAI's legacy bounds and default.
MAX_LEGACY_LOGPROBS = 5
DEFAULT_MAX_TOKENS = 16

# This surface's own fields, and the chat request's that mean nothing for a raw prompt (they
# are named back in X-Ignored-Fields); every other field is the internal request's.
_OWN_FIELDS = ("prompt", "suffix", "echo", "logprobs", "best_of", "n", "max_tokens")
_CHAT_ONLY_FIELDS = (
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_completion_tokens",
    "top_logprobs",
    "prompt_logprobs",
    "min_pixels",
    "max_pixels",
)


class CompletionRequest(BaseModel):
    """The fields of a completions body beside the internal request's."""

    model_config = ConfigDict(strict=True, extra="allow")

    # A string, a list of strings, token ids, or a list of token-id lists (`_prompts`).
    prompt: Any
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    n: int | None = sampling("n", to_model=False)
    best_of: int | None = sampling("n", to_model=False)
    max_tokens: int | None = sampling("max_tokens", to_model=False)
    stream: bool | None = None


@dataclass
class CompletionCall:
    """One completions request: its prompts as internal requests, and how to render them."""

    prompts: list[RawPrompt]
    chats: list[ChatCompletionRequest]
    n: int
    best_of: int
    echo: bool
    logprobs: int | None  # the legacy integer; None: no logprobs in the output
    stream: bool
    include_usage: bool
    continuous_usage: bool
    user: str | None
    ignored_fields: list[str] = field(default_factory=list)

    @property
    def ranks_choices(self) -> bool:
        return self.best_of > self.n


def parse_completion_request(body: dict[str, Any]) -> CompletionCall:
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc, body) from None
    if request.suffix is not None:
        raise UNSUPPORTED_PARAMETER(
            "suffix",
            message="'suffix' is not supported: this model has no fill-in-the-middle mode.",
        )
    prompts = _prompts(request.prompt)
    n = request.n or 1
    best_of = request.best_of or n
    if best_of < n:
        raise INVALID_VALUE(
            "best_of", message=f"Invalid value for 'best_of': it must be at least n ({n})."
        )
    if best_of > n and request.stream:
        raise INVALID_VALUE(
            "best_of",
            message="Invalid value for 'best_of': it must equal n when streaming, since the "
            "best choices are known only at the end.",
        )
    internal = {k: v for k, v in body.items() if k not in _OWN_FIELDS + _CHAT_ONLY_FIELDS}
    internal["max_tokens"] = (
        request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
    )
    if best_of > 1:
        internal["n"] = best_of
    if request.logprobs is not None or best_of > n:  # ranking needs the chosen tokens' logprobs
        internal["logprobs"] = True
        internal["top_logprobs"] = request.logprobs or 0
    chats = []
    for prompt in prompts:
        chat = parse_chat_request(internal, _paths(prompt.param, request.best_of), prompt)
        if request.echo and request.logprobs is not None:
            # The prompt's own logprobs, for the echoed prompt tokens. Set here: the internal
            # request's rule against them while streaming is chat's, whose chunks have no
            # place for them; a streamed completion sends them with the echoed prompt.
            chat.prompt_logprobs = request.logprobs
        chats.append(chat)
    first = chats[0]
    ignored = [name for name in body if name in _CHAT_ONLY_FIELDS] + first.ignored_fields
    return CompletionCall(
        prompts=prompts,
        chats=chats,
        n=n,
        best_of=best_of,
        echo=bool(request.echo),
        logprobs=request.logprobs,
        stream=first.is_stream,
        include_usage=first.include_usage,
        continuous_usage=first.continuous_usage,
        user=first.user,
        ignored_fields=ignored,
    )


def _prompts(prompt: Any) -> list[RawPrompt]:
    """One RawPrompt per prompt, each with the client's path to it: a string, a list of
    strings, a list of token ids, or a list of token-id lists; empty ones refused."""
    if isinstance(prompt, str):
        prompts = [RawPrompt(text=prompt, param="prompt")]
    elif not isinstance(prompt, list):
        raise _prompt_type_error("prompt", prompt)
    elif prompt and all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        prompts = [RawPrompt(token_ids=_token_ids(prompt, "prompt"), param="prompt")]
    else:
        prompts = []
        for i, item in enumerate(prompt):
            param = f"prompt[{i}]"
            if isinstance(item, str):
                prompts.append(RawPrompt(text=item, param=param))
            elif isinstance(item, list):
                prompts.append(RawPrompt(token_ids=_token_ids(item, param), param=param))
            else:
                raise _prompt_type_error(param, item)
    if not prompts:
        raise INVALID_VALUE("prompt", message="Invalid value for 'prompt': it holds no prompt.")
    for each in prompts:
        if not (each.text or each.token_ids):
            raise INVALID_VALUE(
                each.param, message=f"Invalid value for '{each.param}': it is empty."
            )
    return prompts


def _token_ids(items: list[Any], param: str) -> tuple[int, ...]:
    for j, token in enumerate(items):
        if isinstance(token, bool) or not isinstance(token, int):
            raise INVALID_TYPE(
                f"{param}[{j}]",
                message=f"Invalid type for '{param}[{j}]': expected a token id (an integer).",
            )
        if not 0 <= token <= INT32_MAX:
            raise INVALID_VALUE(
                f"{param}[{j}]",
                message=f"Invalid value for '{param}[{j}]': a token id is at least 0 and at "
                f"most {INT32_MAX}.",
            )
    return tuple(items)


def _prompt_type_error(param: str, value: Any) -> APIError:
    return INVALID_TYPE(
        param,
        message=f"Invalid type for '{param}': expected a string, an array of strings, an array "
        "of token ids or an array of token-id arrays.",
    )


def _paths(prompt: str, best_of: int | None) -> ClientPaths:
    """The model names its inputs and the internal request's fields; the client sent these."""
    return ClientPaths(
        renames=(
            ("text_input", prompt),
            ("input_ids", prompt),
            ("messages", prompt),
            ("n", "best_of" if best_of is not None else "n"),
            ("top_logprobs", "logprobs"),
            ("prompt_logprobs", "logprobs"),
        )
    )


# ---- the output ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionIdentity(ChatIdentity):
    ID_PREFIX: ClassVar[str] = "cmpl"

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }


@dataclass
class LegacyLogprobs:
    """The legacy `logprobs` object of one choice, built token by token."""

    top: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add_prompt(self, prompt_logprobs: list[Any], prompt_text: str, offset: int = 0) -> None:
        """The echoed prompt's tokens from the model's prompt logprobs (vLLM's shape: None for
        the first token, then {token id: {logprob, rank, decoded_token}} with the prompt token
        itself first). Nothing scores the first token, so its text is what the others leave
        of the prompt."""
        scored = [list(position.values()) for position in prompt_logprobs[1:] if position]
        rest = [entries[0]["decoded_token"] for entries in scored]
        first = prompt_text[: max(0, len(prompt_text) - sum(len(text) for text in rest))]
        self._add(first, None, None, offset)
        offset += len(first)
        for text, entries in zip(rest, scored):
            alternatives = _by_text((e["decoded_token"], e["logprob"]) for e in entries[1:])
            alternatives.setdefault(text, entries[0]["logprob"])
            self._add(text, entries[0]["logprob"], alternatives, offset)
            offset += len(text)

    def add_tokens(self, entries: list[dict[str, Any]], offset: int) -> int:
        """The generated tokens' entries (OpenAI's chat shape, as the model sends them) from
        `offset` in the choice's text; the offset after them."""
        for entry in entries:
            token = entry["token"]
            alternatives = _by_text((top["token"], top["logprob"]) for top in entry["top_logprobs"])
            alternatives.setdefault(token, entry["logprob"])
            self._add(token, entry["logprob"], alternatives, offset)
            offset += len(token)
        return offset

    def _add(self, token: str, logprob, alternatives, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(alternatives)
        self.text_offset.append(offset)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _by_text(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Alternatives by their text, best first; tokens whose text is the same (bytes of an
    incomplete character both read as U+FFFD) keep the best one's logprob."""
    alternatives: dict[str, float] = {}
    for text, logprob in sorted(pairs, key=lambda pair: -pair[1]):
        alternatives.setdefault(text, logprob)
    return alternatives


def mean_logprob(entries: list[dict[str, Any]]) -> float:
    """A choice's score for `best_of`: the mean logprob of its tokens."""
    if not entries:
        return float("-inf")
    return sum(entry["logprob"] for entry in entries) / len(entries)
