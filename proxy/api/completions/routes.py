"""`POST /v1/completions`: parse (protocol.py), one generation per prompt on the shared request
path (proxy/request/generation.py), then one `text_completion` body or a stream of them.

The prompts of one request generate concurrently (the model batches them); their chunks are
merged as they come, each choice renumbered prompt by prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ...error_catalogue import INTERNAL_ERROR, TOO_MANY_PROMPTS, APIError
from ...errors import REQUEST_ID_KEY, json_dumps
from ...keys import CONFIG_KEY, MODEL_LIMITS_KEY
from ...request.generation import (
    SSE_HEADERS,
    Generation,
    note_request_fields,
    read_json_object,
    report_usage,
    run_task,
    start_generation,
    write_events,
)
from ...request.sse import DONE_EVENT, sse_error, sse_event
from ...request.usage import TokenUsage, record_usage, total_usage
from ...transport.backend import DEFAULT_PROMPT_OPTIONS, GenerationChunk
from ...transport.contract import Task
from .protocol import (
    CompletionCall,
    CompletionIdentity,
    LegacyLogprobs,
    mean_logprob,
    parse_completion_request,
)

log = logging.getLogger("proxy")


@dataclass
class PromptRun:
    """One prompt's generation and what its choices share."""

    generation: Generation
    echo: str  # the prompt's text in front of each choice's text ("" without echo)
    prompt_logprobs: list[Any] | None = None  # the model's, once a chunk brought them


async def create_completion(request: web.Request) -> web.StreamResponse:
    call = parse_completion_request(await read_json_object(request))
    limit = request.app[CONFIG_KEY].limits.max_prompts
    if len(call.prompts) > limit:
        raise TOO_MANY_PROMPTS("prompt", count=len(call.prompts), limit=limit)
    note_request_fields(request, call)
    runs = [await _start(request, call, index) for index in range(len(call.prompts))]
    first = runs[0].generation
    identity = CompletionIdentity.new(first.served_name)
    with request.app[MODEL_LIMITS_KEY].forgotten_on_outage(first.triton_model):
        chunks = merged([run.generation.chunks for run in runs])
        async with contextlib.aclosing(chunks):
            if call.stream:
                return await _stream(request, call, runs, identity, chunks)
            body = await _collect(call, runs, identity, chunks)
            if len(runs) > 1:
                report_usage(request, total_usage(run.generation.usage for run in runs))
            return web.json_response(body, dumps=json_dumps)


async def _start(request: web.Request, call: CompletionCall, index: int) -> PromptRun:
    """The generation of prompt `index` (not started until its chunks are awaited) and its
    echo: the prompt's text, which the model gives for a prompt of token ids."""
    prompt, chat = call.prompts[index], call.chats[index]
    echo = ""
    if call.echo:
        echo = prompt.text
        if echo is None:
            _, echo = await run_task(request, chat, Task.DETOKENIZE, DEFAULT_PROMPT_OPTIONS)
    return PromptRun(await start_generation(request, chat), echo)


async def merged(
    streams: list[AsyncGenerator[GenerationChunk, None]],
) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """(stream index, chunk) of every stream as the chunks come; the first error raises.
    Closing this closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | None, BaseException | None]]
    queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    queue.put_nowait((index, chunk, None))
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait((index, None, exc))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                running -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- non-streamed --------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str = ""
    entries: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"


async def _collect(
    call: CompletionCall,
    runs: list[PromptRun],
    identity: CompletionIdentity,
    chunks: AsyncIterator[tuple[int, GenerationChunk]],
) -> dict[str, Any]:
    choices = [[_Choice() for _ in range(call.best_of)] for _ in runs]
    async for prompt, chunk in chunks:
        run = runs[prompt]
        record_usage(run.generation.usage, chunk)
        if chunk.prompt_logprobs is not None:
            run.prompt_logprobs = chunk.prompt_logprobs
        choice = choices[prompt][chunk.index]
        choice.text += chunk.text
        choice.entries += chunk.logprobs or []
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
    rendered = []
    for prompt, (run, generated) in enumerate(zip(runs, choices)):
        if call.ranks_choices:
            generated = sorted(generated, key=lambda c: mean_logprob(c.entries), reverse=True)
        for j, choice in enumerate(generated[: call.n]):
            logprobs = _logprobs(call, run, choice.entries, first=True)
            rendered.append(
                {
                    "text": run.echo + choice.text,
                    "index": prompt * call.n + j,
                    "logprobs": None if logprobs is None else logprobs.as_dict(),
                    "finish_reason": choice.finish_reason,
                }
            )
    usage = total_usage(run.generation.usage for run in runs)
    return {**identity.envelope(), "choices": rendered, "usage": usage.as_dict()}


def _logprobs(
    call: CompletionCall,
    run: PromptRun,
    entries: list[dict[str, Any]],
    *,
    first: bool,
    offset: int = 0,
) -> LegacyLogprobs | None:
    """The legacy logprobs of a choice's tokens from `offset` in its text; the first output
    of a choice starts with the echoed prompt's tokens."""
    if call.logprobs is None:
        return None
    logprobs = LegacyLogprobs(call.logprobs)
    if first and call.echo:
        if run.prompt_logprobs is not None:
            logprobs.add_prompt(run.prompt_logprobs, run.echo)
        else:  # a model that does not answer prompt_logprobs: the prompt's tokens are unknown
            log.warning("the model sent no prompt logprobs for an echoed prompt")
        offset = len(run.echo)
    logprobs.add_tokens(entries, offset)
    return logprobs


# ---- streamed ------------------------------------------------------------------------------


async def _stream(
    request: web.Request,
    call: CompletionCall,
    runs: list[PromptRun],
    identity: CompletionIdentity,
    chunks: AsyncIterator[tuple[int, GenerationChunk]],
) -> web.StreamResponse:
    # Waiting for the first chunk before sending headers lets an early failure (the model
    # rejects the request, Triton down) reach the client as a real HTTP error status.
    first = await anext(chunks, None)
    events = _events(request, call, runs, identity, first, chunks)
    response = await write_events(request, events, SSE_HEADERS)
    if len(runs) > 1:
        report_usage(request, total_usage(run.generation.usage for run in runs))
    return response


async def _events(
    request: web.Request,
    call: CompletionCall,
    runs: list[PromptRun],
    identity: CompletionIdentity,
    first: tuple[int, GenerationChunk] | None,
    rest: AsyncIterator[tuple[int, GenerationChunk]],
) -> AsyncGenerator[bytes, None]:
    """One event per model response (its choice's text, logprobs and finish reason), the
    usage chunk when asked, [DONE]; an error mid-stream as an error event."""
    envelope = identity.envelope()
    offsets: dict[int, int] = {}  # choice index -> characters of its text sent so far

    def event(prompt: int, chunk: GenerationChunk) -> bytes | None:
        run = runs[prompt]
        record_usage(run.generation.usage, chunk)
        if chunk.prompt_logprobs is not None:
            run.prompt_logprobs = chunk.prompt_logprobs
        index = prompt * call.n + chunk.index
        started = index in offsets
        text = chunk.text if started else run.echo + chunk.text
        if started and not text and not chunk.logprobs and chunk.finish_reason is None:
            return None
        logprobs = _logprobs(
            call, run, chunk.logprobs or [], first=not started, offset=offsets.get(index, 0)
        )
        offsets[index] = offsets.get(index, 0) + len(text)
        choice = {
            "text": text,
            "index": index,
            "logprobs": None if logprobs is None else logprobs.as_dict(),
            "finish_reason": chunk.finish_reason,
        }
        body: dict[str, Any] = {**envelope, "choices": [choice]}
        if call.continuous_usage:
            body["usage"] = total_usage(run.generation.usage for run in runs).as_dict()
        elif call.include_usage:
            body["usage"] = None
        return sse_event(body)

    request_id = request[REQUEST_ID_KEY]
    try:
        data = event(*first) if first is not None else None
        if data is not None:
            yield data
        async for prompt, chunk in rest:
            data = event(prompt, chunk)
            if data is not None:
                yield data
    except APIError as exc:
        log.warning("request %s: failed mid-stream: %s %s", request_id, exc.status, exc.message)
        yield sse_error(exc)
        return
    except Exception:
        log.exception("request %s: failed mid-stream", request_id)
        yield sse_error(INTERNAL_ERROR(request_id=request_id))
        return
    tail = b""
    if call.include_usage:
        usage: TokenUsage = total_usage(run.generation.usage for run in runs)
        tail = sse_event({**envelope, "choices": [], "usage": usage.as_dict()})
    yield tail + DONE_EVENT
