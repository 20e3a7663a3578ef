"""Response assembly: the model's chunks -> OpenAI chat completion bodies and SSE events.

Pure of HTTP: proxy/app.py writes what these build. A non-streamed completion is collected
into one `chat.completion` body; a streamed one becomes `chat.completion.chunk` events (one
role chunk per choice first, content chunks, one finish chunk per choice, the usage chunk
when asked, `[DONE]`), with an error mid-stream sent as an error event.

Extensions: `usage` on every chunk with `stream_options.continuous_usage_stats` (vLLM's: the
counts so far); `repetition_detected: true` on a choice the repetition guard ended (its finish
chunk when streaming); vLLM's `prompt_logprobs` beside `choices`; the request's stage
`timings` beside `usage` (on the last chunk when streaming) when they were asked for.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...error_catalogue import INTERNAL_ERROR, APIError
from ...request.sse import DONE_EVENT, json_bytes, sse_error, sse_event
from ...request.tool_calls import ToolCall, ToolCallStream, split_tool_calls
from ...request.usage import TokenUsage, record_usage
from ...transport.backend import GenerationChunk

log = logging.getLogger("proxy")


@dataclass(frozen=True)
class CompletionIdentity:
    """The fields every response body and chunk of one completion share."""

    ID_PREFIX: ClassVar[str] = "chatcmpl"

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> CompletionIdentity:
        return cls(id=f"{cls.ID_PREFIX}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


@dataclass
class ChoiceText:
    """One choice of a non-streamed completion, assembled from its chunks."""

    text: str = ""
    finish_reason: str = "stop"
    # every token's entry when the client asked for logprobs, else None
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    repetition_detected: bool = False  # the repetition guard ended it

    def take_tool_calls(self) -> None:
        """Moves the `<tool_call>` blocks of the text into `tool_calls`."""
        self.text, self.tool_calls = split_tool_calls(self.text)
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def message(self) -> dict[str, Any]:
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        return {
            "role": "assistant",
            "content": self.text or None,
            "tool_calls": [call.as_dict() for call in self.tool_calls],
        }


def completion_body(
    identity: CompletionIdentity,
    choices: list[ChoiceText],
    usage: TokenUsage,
    *,
    prompt_logprobs: list[Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": identity.id,
        "object": "chat.completion",
        "created": identity.created,
        "model": identity.model,
        "choices": [_choice(index, choice) for index, choice in enumerate(choices)],
        "usage": usage.as_dict(),
    }
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    if timings is not None:
        body["timings"] = timings
    return body


def _choice(index: int, choice: ChoiceText) -> dict[str, Any]:
    entry = {
        "index": index,
        "message": choice.message(),
        "logprobs": logprobs_field(choice.logprobs),
        "finish_reason": choice.finish_reason,
    }
    if choice.repetition_detected:
        entry["repetition_detected"] = True
    return entry


def chunk_body(
    identity: CompletionIdentity,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    *,
    include_usage: bool = False,
    logprobs: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice; `usage: null` when usage was asked for."""
    body = _chunk_envelope(identity)
    body["choices"] = [
        {
            "index": index,
            "delta": delta,
            "logprobs": logprobs_field(logprobs),
            "finish_reason": finish_reason,
        }
    ]
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(
    identity: CompletionIdentity, usage: TokenUsage, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the totals (and
    the request's stage timings when asked for)."""
    body = _chunk_envelope(identity)
    body["choices"] = []
    body["usage"] = usage.as_dict()
    if timings is not None:
        body["timings"] = timings
    return body


def logprobs_field(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries}


def _chunk_envelope(identity: CompletionIdentity) -> dict[str, Any]:
    return {
        "id": identity.id,
        "object": "chat.completion.chunk",
        "created": identity.created,
        "model": identity.model,
    }


# ---- assembling a completion from its chunks ----------------------------------------


async def collect_completion(
    chunks: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    with_logprobs: bool,
    parse_tool_calls: bool = False,
    timings: Callable[[], dict[str, float] | None] | None = None,
) -> dict[str, Any]:
    """The `chat.completion` body of a non-streamed completion; fills in `usage`. `timings`:
    the request's stage timings once its chunks are in (None: not asked for)."""

    def new_choice() -> ChoiceText:
        return ChoiceText(logprobs=[] if with_logprobs else None)

    choices = {0: new_choice()}  # choice 0 is answered even when the model sent no text
    prompt_logprobs = None
    async for chunk in chunks:
        record_usage(usage, chunk)
        choice = choices.setdefault(chunk.index, new_choice())
        choice.text += chunk.text
        if choice.logprobs is not None and chunk.logprobs:
            choice.logprobs.extend(chunk.logprobs)
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        choice.repetition_detected = choice.repetition_detected or chunk.repetition_detected
        prompt_logprobs = chunk.prompt_logprobs or prompt_logprobs
    if parse_tool_calls:
        for choice in choices.values():
            choice.take_tool_calls()
    return completion_body(
        identity,
        [choices[i] for i in sorted(choices)],
        usage,
        prompt_logprobs=prompt_logprobs,
        timings=timings() if timings is not None else None,
    )


async def completion_events(
    first: GenerationChunk | None,
    rest: AsyncIterator[GenerationChunk],
    identity: CompletionIdentity,
    usage: TokenUsage,
    request_id: str,
    *,
    include_usage: bool = False,
    with_logprobs: bool = False,
    parse_tool_calls: bool = False,
    continuous_usage: bool = False,
    timings: Callable[[], dict[str, float] | None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one streamed completion, errors included, ending with [DONE].
    `continuous_usage`: every chunk carries the usage so far (vLLM's continuous_usage_stats);
    `timings`: the request's stage timings, on the last chunk (None: not asked for).

    Each content chunk carries the logprobs of the tokens it covers when they were asked for
    (with tool calls parsed, text held back as a possible tag start passes its logprobs to
    the next content chunk, and a call's tokens have none). A tool call is two deltas, as
    OpenAI sends them: index, id, type and name first, then the arguments.

    The events ready together go out as one write: those of one model response (the role
    chunk with the first), and the end (finish chunks, usage, [DONE]).
    """
    role_delta = {"role": "assistant", "content": ""}
    event = ChunkEvents(identity, include_usage, usage if continuous_usage else None)
    choices = {0: _StreamedChoice(parse_tool_calls)}  # each one's first chunk has the role
    # the role chunk's usage: the prompt, nothing generated yet
    before = TokenUsage() if first is None else _prompt_only(first)
    pending = [event(role_delta, usage=before)]

    def add_events(chunk: GenerationChunk) -> None:
        record_usage(usage, chunk)
        if chunk.index not in choices:
            choices[chunk.index] = _StreamedChoice(parse_tool_calls)
            pending.append(event(role_delta, index=chunk.index))
        choice = choices[chunk.index]
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        choice.repetition_detected = choice.repetition_detected or chunk.repetition_detected
        for delta, logprobs in choice.deltas(chunk, with_logprobs):
            pending.append(event(delta, logprobs=logprobs, index=chunk.index))

    try:
        if first is not None:
            add_events(first)
        yield b"".join(pending)
        pending.clear()
        async for chunk in rest:
            add_events(chunk)
            if pending:
                yield b"".join(pending)
                pending.clear()
        for index, choice in sorted(choices.items()):
            for delta, logprobs in choice.rest(with_logprobs):
                pending.append(event(delta, logprobs=logprobs, index=index))
    except APIError as exc:
        log.warning("request %s: failed mid-stream: %s %s", request_id, exc.status, exc.message)
        yield b"".join(pending) + sse_error(exc)
        return
    except Exception:
        log.exception("request %s: failed mid-stream", request_id)
        yield b"".join(pending) + sse_error(INTERNAL_ERROR(request_id=request_id))
        return
    stages = timings() if timings is not None else None
    last = max(choices)
    for index, choice in sorted(choices.items()):
        flag = {"repetition_detected": True} if choice.repetition_detected else None
        top = (
            {"timings": stages}
            if stages is not None and index == last and not include_usage
            else None
        )
        pending.append(
            event({}, choice.final_reason(), index=index, choice_extra=flag, top_extra=top)
        )
    if include_usage:
        pending.append(sse_event(usage_chunk_body(identity, usage, stages)))
    pending.append(DONE_EVENT)
    yield b"".join(pending)


def _prompt_only(chunk: GenerationChunk) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=chunk.prompt_tokens or 0,
        image_tokens=chunk.image_tokens,
        video_tokens=chunk.video_tokens,
    )


class ChunkEvents:
    """`sse_event(chunk_body(...))` of one completion, byte for byte, without building the
    body: the envelope (id, object, created, model) is encoded once and each event splices
    its choice in. With `usage` (continuous usage stats) every event carries its counts at the
    time of the call instead of `"usage": null`."""

    def __init__(
        self, identity: CompletionIdentity, include_usage: bool, usage: TokenUsage | None = None
    ) -> None:
        envelope = json_bytes(_chunk_envelope(identity))  # b'{"id":...,"model":"..."}'
        self._prefix = b"data: " + envelope[:-1] + b',"choices":[{"index":'
        self._usage = usage
        self._suffix = b"}]" + (b',"usage":null' if include_usage else b"")

    def __call__(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        *,
        logprobs: list[dict[str, Any]] | None = None,
        index: int = 0,
        choice_extra: dict[str, Any] | None = None,
        top_extra: dict[str, Any] | None = None,
        usage: TokenUsage | None = None,
    ) -> bytes:
        """`choice_extra`, `top_extra`: fields added to the choice and to the chunk; `usage`:
        the counts this event carries instead of the running ones (continuous usage)."""
        if self._usage is None:
            suffix = self._suffix
        else:
            suffix = b'}],"usage":' + json_bytes((usage or self._usage).as_dict())
        return b"".join(
            (
                self._prefix,
                b"%d" % index,
                b',"delta":',
                json_bytes(delta),
                b',"logprobs":',
                b"null" if logprobs is None else _logprobs_json(logprobs),
                b',"finish_reason":',
                b"null" if finish_reason is None else json_bytes(finish_reason),
                b"" if choice_extra is None else b"," + json_bytes(choice_extra)[1:-1],
                suffix,
                b"" if top_extra is None else b"," + json_bytes(top_extra)[1:-1],
                b"}\n\n",
            )
        )


def _logprobs_json(entries: list[dict[str, Any]]) -> bytes:
    field = logprobs_field(entries)
    if all(_finite(entry) for entry in entries):
        return json_bytes(field)
    # json's NaN/Infinity where orjson would write null: what the stream always sent
    return json.dumps(field, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _finite(entry: dict[str, Any]) -> bool:
    return math.isfinite(entry.get("logprob", 0.0)) and all(
        math.isfinite(top.get("logprob", 0.0)) for top in entry.get("top_logprobs") or ()
    )


class _StreamedChoice:
    """One choice of a stream: its finish reason and, with tools, its tool-call parser."""

    def __init__(self, parse_tool_calls: bool) -> None:
        self.finish_reason = "stop"
        self.repetition_detected = False
        self._calls = ToolCallStream() if parse_tool_calls else None
        self._held_logprobs: list[dict[str, Any]] = []

    def deltas(self, chunk: GenerationChunk, with_logprobs: bool) -> Iterator[tuple[dict, Any]]:
        """(delta, logprobs) for each event of `chunk`."""
        logprobs = (chunk.logprobs or []) if with_logprobs else None
        if self._calls is None:
            if chunk.text or logprobs:
                yield {"content": chunk.text}, logprobs
            return
        self._held_logprobs += logprobs or []
        yield from self._events(self._calls.feed(chunk.text), with_logprobs)

    def rest(self, with_logprobs: bool) -> Iterator[tuple[dict, Any]]:
        if self._calls is not None:
            yield from self._events(self._calls.finish(), with_logprobs)

    def final_reason(self) -> str:
        if self._calls is not None and self._calls.calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason

    def _events(self, events, with_logprobs: bool) -> Iterator[tuple[dict, Any]]:
        for kind, value in events:
            if kind == "content":
                logprobs, self._held_logprobs = self._held_logprobs, []
                yield {"content": value}, (logprobs if with_logprobs else None)
                continue
            self._held_logprobs = []  # a call's tokens carry no content logprobs
            index = self._calls.calls - 1
            head = {"index": index, "id": value.id, "type": "function"}
            yield (
                {"tool_calls": [{**head, "function": {"name": value.name, "arguments": ""}}]},
                None,
            )
            yield (
                {"tool_calls": [{"index": index, "function": {"arguments": value.arguments}}]},
                None,
            )
