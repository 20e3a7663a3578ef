"""Generation engine: a worker thread that runs one request at a time with HF `generate`.

The engine owns everything after the raw inputs arrive (preprocessing, generation, text
assembly), so `execute` returns at once and the Triton instance keeps accepting requests.
It talks to the caller only through a `ResponseSink`; a batching engine can replace it behind
the same `submit` / `shutdown` interface.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Protocol

from .checkpoint import Checkpoint
from .detokenize import TextAssembler
from .errors import EngineFullError
from .prepare import PreparedRequest, RawRequest, prepare
from .settings import ModelSettings

log = logging.getLogger(__name__)


class ResponseSink(Protocol):
    """Where one request's output goes. Exactly one final call: finish, fail or cancelled."""

    def is_cancelled(self) -> bool: ...

    def send(self, text: str, num_tokens: int, prompt_tokens: int) -> None: ...

    def finish(self, text: str, num_tokens: int, prompt_tokens: int, finish_reason: str) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> None: ...


class _Cancelled(Exception):
    pass


class _TokenStreamer:
    """HF `generate` streamer: feeds each new token to the assembler, streams text out."""

    def __init__(self, request: PreparedRequest, assembler: TextAssembler, sink: ResponseSink):
        self._request = request
        self._assembler = assembler
        self._sink = sink
        self._seen_prompt = False
        self.last_token: int | None = None
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        if not self._seen_prompt:  # generate hands the prompt over first
            self._seen_prompt = True
            return
        for token_id in value.reshape(-1).tolist():
            self.first_token_at = self.first_token_at or time.monotonic()
            self.last_token = token_id
            text, tokens = self._assembler.push(token_id)
            if text and self._request.raw.stream:
                self._sink.send(text, tokens, self._request.prompt_tokens)

    def end(self) -> None:
        pass


class _StopWhen:
    """StoppingCriteria: a cancelled request or a matched stop string ends generation."""

    def __init__(self, sink: ResponseSink, assembler: TextAssembler):
        self._sink = sink
        self._assembler = assembler
        self.cancelled = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self._sink.is_cancelled():
            self.cancelled = True
        done = self.cancelled or self._assembler.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generation_kwargs(request: PreparedRequest) -> dict:
    sampling = request.sampling
    kwargs = {"max_new_tokens": request.max_new_tokens}
    if sampling.greedy:
        kwargs["do_sample"] = False
    elif any(v is not None for v in (sampling.temperature, sampling.top_p, sampling.top_k)):
        kwargs["do_sample"] = True
        if sampling.temperature is not None:
            kwargs["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            kwargs["top_p"] = sampling.top_p
        if sampling.top_k is not None:
            kwargs["top_k"] = sampling.top_k if sampling.top_k > 0 else 0
    if sampling.repetition_penalty is not None:
        kwargs["repetition_penalty"] = sampling.repetition_penalty
    return kwargs


def _finish_reason(assembler: TextAssembler, last_token: int | None, checkpoint: Checkpoint,
                   request: PreparedRequest) -> str:
    if assembler.stopped or last_token in checkpoint.eos_token_ids:
        return "stop"
    return "length" if assembler.num_tokens >= request.max_new_tokens else "stop"


def generate(request: PreparedRequest, checkpoint: Checkpoint, sink: ResponseSink) -> None:
    """Run one prepared request to completion, cancellation or error, reporting to `sink`."""
    import torch
    from transformers import StoppingCriteriaList

    assembler = TextAssembler(checkpoint.decode, request.sampling.stop)
    streamer = _TokenStreamer(request, assembler, sink)
    stop_when = _StopWhen(sink, assembler)
    if request.sampling.seed is not None:
        torch.manual_seed(request.sampling.seed)
    started = time.monotonic()
    with torch.inference_mode():
        checkpoint.model.generate(
            **request.inputs, **generation_kwargs(request), streamer=streamer,
            stopping_criteria=StoppingCriteriaList([stop_when]),
            pad_token_id=checkpoint.tokenizer.pad_token_id,
        )
    if stop_when.cancelled:
        log.info("request %s cancelled after %d tokens", request.raw.request_id, assembler.num_tokens)
        sink.cancelled()
        return
    text, tokens = assembler.finish()
    if not request.raw.stream:
        text = assembler.text
        tokens = assembler.num_tokens
        if not request.raw.exclude_input_in_output:
            text = request.prompt + text
    reason = _finish_reason(assembler, streamer.last_token, checkpoint, request)
    sink.finish(text, tokens, request.prompt_tokens, reason)
    elapsed = time.monotonic() - started
    ttft = (streamer.first_token_at or time.monotonic()) - started
    log.info("request %s done: %d prompt + %d completion tokens, finish_reason=%s, "
             "ttft %.3fs, total %.3fs", request.raw.request_id, request.prompt_tokens,
             assembler.num_tokens, reason, ttft, elapsed)


class SerialEngine:
    """One request at a time, in arrival order; a bounded queue in front."""

    def __init__(self, checkpoint: Checkpoint, settings: ModelSettings,
                 prepare_fn: Callable[..., PreparedRequest] = prepare):
        self._checkpoint = checkpoint
        self._settings = settings
        self._prepare = prepare_fn
        self._queue: queue.Queue = queue.Queue(maxsize=settings.max_queued_requests)
        self._thread = threading.Thread(target=self._run, name="qwen-vl-engine", daemon=True)
        self._thread.start()

    def submit(self, raw: RawRequest, sink: ResponseSink) -> None:
        try:
            self._queue.put_nowait((raw, sink))
        except queue.Full:
            raise EngineFullError(
                f"{self._settings.max_queued_requests} requests are already waiting") from None

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop taking work; wait up to `timeout` for queued and running requests."""
        self._queue.put((None, None))
        self._thread.join(self._settings.shutdown_timeout_s if timeout is None else timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            raw, sink = self._queue.get()
            if raw is None:
                return
            self._serve(raw, sink)

    def _serve(self, raw: RawRequest, sink: ResponseSink) -> None:
        try:
            if sink.is_cancelled():
                sink.cancelled()
                return
            generate(self._prepare(raw, self._checkpoint, self._settings), self._checkpoint, sink)
        except BaseException as exc:  # every request ends with exactly one final response
            sink.fail(exc)
