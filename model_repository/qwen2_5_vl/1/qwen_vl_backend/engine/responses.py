"""Responses off the engine thread: detokenizing, stop strings, coalescing, sends, cancellation.

The engine thread posts what each step produced (one list of `Token` and `Failure` events per
step) to a `ResponseSender`; its thread turns tokens into text (`TextAssembler`: UTF-8
hold-back, stop strings), builds the responses and sends them, so the next forward runs while the
previous step's responses go out (a Triton `send` waits for a round trip with tritonserver).

- Order: one thread sends everything, in the order the engine posted it, so a request's
  responses keep their order and its FINAL response is its last.
- Coalescing: the sender takes every step waiting in its queue at once and sends at most one
  streamed response per choice for all of them, so a client whose sends fall behind gets fewer,
  larger chunks instead of a growing backlog. `stream_interval` asks for that always: a streamed
  response then carries at least that many tokens (but the first, which goes out at once).
- Stop strings are found here, a step or two after the engine sampled the token: the choice
  ends here (its text cut as before), and the engine drops the sequence when it reads
  `take_closed`; the tokens it computed meanwhile are discarded.
- Cancellation is polled here on a timer (`cancel_poll_ms`), one `is_cancelled` round trip per
  live request per period instead of per sequence per step on the engine thread.
- Every registered request gets exactly one final call (a FINAL chunk, `fail` or `cancelled`),
  whatever fails: a sink that raises fails its own request, and requests still open when the
  engine stops are failed.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..errors import EngineStoppingError
from .detokenize import TextAssembler
from .sampling import TokenLogprobs, TokenTexts, logprob_entry, prompt_logprob_entries

log = logging.getLogger(__name__)


@dataclass
class OutputChunk:
    """One response's worth of output for choice `index`; `finish_reason` is set on a choice's
    last chunk, and `final` on the request's last response (the last choice to finish)."""

    text: str
    num_tokens: int
    prompt_tokens: int
    image_tokens: int
    finish_reason: str | None = None
    logprobs: list[dict] | None = None
    index: int = 0
    final: bool = False
    video_tokens: int = 0
    # the request's stage timings (contract.TIMING_STAGES) on its final response when asked
    timings: dict[str, float] | None = None
    # vLLM's prompt_logprobs on the request's first response when asked
    prompt_logprobs: list | None = None
    repetition_detected: bool = False  # the repetition guard ended this choice (its last chunk)
    stop_reason: str | None = None  # the stop string that ended the choice (its last chunk)
    # the request's images and videos the embedding cache answered (its final response)
    media_cache_hits: int = 0


class ResponseSink(Protocol):
    """Where one request's output goes. Exactly one final call: a chunk with `final` set,
    `fail` or `cancelled`. Called on the sender thread only."""

    def is_cancelled(self) -> bool: ...

    def send(self, chunk: OutputChunk) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> None: ...


class TaskSink(Protocol):
    """Where the answer of a task other than generation goes (`BatchingEngine.submit_task`):
    exactly one call, `answer` or `fail`, on a preparation thread."""

    def answer(self, text: str) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class RequestStream:
    """The sender's side of one request: its sink, choices and what is due to go out."""

    def __init__(self, prepared, sink: ResponseSink, arrived: float):
        self.prepared = prepared
        self.sink = sink
        self.arrived = arrived
        self.choices: list[ChoiceStream] = []  # those that produced a token, in that order
        self.open_choices = prepared.sampling.n
        self.finals: list[OutputChunk] = []  # choices' last chunks not sent yet
        self.ending: BaseException | str | None = None  # an error, or "cancelled"
        self.closed = False  # no more output will be taken (read by the engine thread)
        self.timings = None  # its RequestTimings (the engine's)
        self.media_cache_hits = 0  # counted by the engine thread at admission
        # (prompt token, logprob, rank, top) per prompt position after the first, gathered by
        # the engine thread before it posts the first token; None when not asked for
        wanted = prepared.sampling.prompt_logprobs is not None
        self.prompt_logprobs: list | None = [] if wanted else None
        self.prompt_logprobs_sent = False

    @property
    def request_id(self) -> str:
        return self.prepared.raw.request_id

    def choice(self, index: int, decode) -> ChoiceStream:
        return ChoiceStream(self, index, decode)

    def choice_finished(self, chunk: OutputChunk) -> None:
        self.open_choices -= 1
        chunk.final = self.open_choices == 0
        if chunk.final:
            chunk.media_cache_hits = self.media_cache_hits
        if chunk.final and self.prepared.raw.return_timings and self.timings is not None:
            chunk.timings = self.timings.stages()
        self.finals.append(chunk)
        self.closed = chunk.final

    def end(self, ending: BaseException | str) -> None:
        """Fail ("error") or cancel: nothing more goes out but the one final call."""
        if not self.closed:
            self.closed, self.ending = True, ending
            self.finals = []


class ChoiceStream:
    """The sender's side of one choice: text assembly, what is pending, whether it ended.
    `first_token_at` is set by the engine thread (before it posts that token)."""

    def __init__(self, request: RequestStream, index: int, decode):
        self.request = request
        self.index = index
        sampling = request.prepared.sampling
        self.assembler = TextAssembler(
            decode, sampling.stop, sampling.include_stop_str_in_output, sampling.min_tokens
        )
        self.with_logprobs = sampling.logprobs
        self.logprobs: list[dict] = []
        self.unsent_logprobs: list[dict] = []
        self.pending: list[str] = []
        self.pending_tokens = 0
        self.sent_any = False
        self.listed = False  # in request.choices
        self.finished = False  # read by the engine thread
        self.first_token_at: float | None = None
        # A streamed choice carries the prompt in front of its first text when the request
        # does not exclude it: the same text a non-streamed response has, in pieces.
        raw = request.prepared.raw
        self.prompt_unsent = raw.stream and not raw.exclude_input_in_output

    def push(
        self,
        token: int,
        finish_reason: str | None,
        logprobs: TokenLogprobs | None,
        texts,
        hidden: bool = False,
    ) -> bool:
        """Take one token (`hidden`: counted, its text not shown); True when a stop string
        ended the choice here (not the engine)."""
        if self.finished or self.request.closed:
            return False
        if not self.listed:
            self.request.choices.append(self)
            self.listed = True
        if self.with_logprobs and logprobs is not None:
            entry = logprob_entry(token, logprobs, texts)
            self.logprobs.append(entry)
            self.unsent_logprobs.append(entry)
        text, tokens = self.assembler.push(token, hidden)
        if text:
            self.pending.append(text)
            self.pending_tokens += tokens
        stopped = self.assembler.stopped and finish_reason is None
        if self.assembler.stopped or finish_reason is not None:
            self._finish("stop" if self.assembler.stopped else finish_reason)
        return stopped

    def due_chunk(self, interval: int) -> OutputChunk | None:
        """The pending text as one streamed response, when it is due."""
        if self.finished or not self.pending or not self.request.prepared.raw.stream:
            return None
        if self.sent_any and self.pending_tokens < interval:
            return None
        self.sent_any = True
        return self._chunk("".join(self.pending), self.pending_tokens)

    def _finish(self, reason: str) -> None:
        self.finished = True
        repetition = reason == "repetition"  # the guard's stop: "stop", flagged
        reason = "stop" if repetition else reason
        tail, tail_tokens = self.assembler.finish()
        text, tokens = "".join(self.pending) + tail, self.pending_tokens + tail_tokens
        prepared = self.request.prepared
        if not prepared.raw.stream:
            text, tokens = self.assembler.text, self.assembler.num_tokens
            self.unsent_logprobs = self.logprobs
            if not prepared.raw.exclude_input_in_output:
                text = prepared.prompt + text
        arrived, now = self.request.arrived, time.monotonic()
        log.info(
            "request %s done: %d prompt (%d image, %d video) + %d completion tokens (choice %d), "
            "finish_reason=%s, ttft %.3fs, total %.3fs",
            prepared.raw.request_id,
            prepared.prompt_tokens,
            prepared.image_tokens,
            prepared.video_tokens,
            self.assembler.num_tokens,
            self.index,
            reason,
            (self.first_token_at or now) - arrived,
            now - arrived,
        )
        chunk = self._chunk(text, tokens, reason)
        chunk.stop_reason = self.assembler.stop_string
        chunk.repetition_detected = repetition
        self.request.choice_finished(chunk)

    def _chunk(self, text: str, tokens: int, finish_reason: str | None = None) -> OutputChunk:
        logprobs = self.unsent_logprobs if self.with_logprobs else None
        self.unsent_logprobs, self.pending, self.pending_tokens = [], [], 0
        prepared = self.request.prepared
        if self.prompt_unsent:
            text, self.prompt_unsent = prepared.prompt + text, False
        return OutputChunk(
            text,
            tokens,
            prepared.prompt_tokens,
            prepared.image_tokens,
            finish_reason,
            logprobs,
            self.index,
            video_tokens=prepared.video_tokens,
        )


class Token(NamedTuple):
    """A sampled token of one choice; `finish_reason` when the engine ends the choice with it
    (EOS, length, a finished grammar)."""

    choice: ChoiceStream
    token: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None
    hidden: bool = False  # a stop token whose text is left out


class Failure(NamedTuple):
    request: RequestStream
    error: BaseException


_STOP = object()


class ResponseSender:
    """The sender thread. `stats` takes the cumulative timers `detokenize_s`, `send_s`,
    `cancellation_s` and the counters `responses`, `sender_wakeups`, `coalesced_steps`;
    `observe.finished` is called here, just before a request's final call."""

    def __init__(
        self, texts: TokenTexts, stream_interval: int, cancel_poll_s: float, observe, stats: Any
    ):
        self._texts = texts
        self._interval = max(1, stream_interval)
        self._poll_s = cancel_poll_s
        self._observe = observe
        self._stats = stats
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, RequestStream] = {}  # registered and not closed
        self._closed: collections.deque = collections.deque()  # for the engine: take_closed
        self._next_poll = time.monotonic() + cancel_poll_s
        self._thread = threading.Thread(target=self._run, name="qwen-vl-sender", daemon=True)
        self._thread.start()

    # ---- called by other threads ----------------------------------------------------------

    def register(self, request: RequestStream) -> None:
        """A request whose output will come (preparation thread), before it reaches the
        engine: from now on it is polled for cancellation and sure of a final call."""
        self._queue.put(request)

    def post(self, events: list) -> None:
        """One step's `Token`s and `Failure`s (engine thread)."""
        self._queue.put(events)

    def take_closed(self) -> list:
        """Requests and choices this thread ended that the engine may still be running
        (cancelled, a send that failed, a stop string); empty almost always."""
        taken = []
        while self._closed:
            taken.append(self._closed.popleft())
        return taken

    def close(self, timeout: float | None = None) -> None:
        """Send what was posted, fail what is still open, stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ---- the sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batches = self._wait()
            stopping = any(batch is _STOP for batch in batches)
            try:
                self._take(batches, stopping)
            except Exception:  # a bug here must not stop every response from going out
                log.exception("the response sender failed a round; it goes on")

    def _take(self, batches: list, stopping: bool) -> None:
        """One round: apply what was posted, poll cancellations when due, send."""
        started = time.perf_counter()
        touched: dict[int, RequestStream] = {}
        steps = 0
        for batch in batches:
            if batch is _STOP:
                continue
            if isinstance(batch, RequestStream):
                self._live[id(batch)] = batch
            else:
                steps += 1
                self._apply(batch, touched)
        if stopping:
            for request in self._live.values():
                request.end(EngineStoppingError("the model is shutting down"))
                touched[id(request)] = request
        applied = time.perf_counter()
        if self._live and time.monotonic() >= self._next_poll:
            self._poll_cancellations(touched)
        polled = time.perf_counter()
        for request in touched.values():
            self._deliver(request)
        stats = self._stats
        stats.detokenize_s += applied - started
        stats.cancellation_s += polled - applied
        stats.send_s += time.perf_counter() - polled
        stats.sender_wakeups += 1
        stats.coalesced_steps += max(0, steps - 1)

    def _wait(self) -> list:
        """Everything queued, after waiting for something or the next cancellation poll."""
        timeout = None
        if self._live:
            timeout = max(0.0, self._next_poll - time.monotonic())
        try:
            batches = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                batches.append(self._queue.get_nowait())
            except queue.Empty:
                return batches

    def _apply(self, events: list, touched: dict[int, RequestStream]) -> None:
        texts = self._texts
        for event in events:
            if isinstance(event, Token):
                request = event.choice.request
                if request.closed:
                    continue
                try:
                    choice = event.choice
                    if choice.push(
                        event.token, event.finish_reason, event.logprobs, texts, event.hidden
                    ):
                        self._closed.append(event.choice)  # the engine still runs it
                except Exception as exc:  # e.g. the tokenizer: this request fails alone
                    log.exception("request %s: building its output failed", request.request_id)
                    request.end(exc)
                    self._closed.append(request)
            else:
                request = event.request
                request.end(event.error)
            touched[id(request)] = request

    def _poll_cancellations(self, touched: dict[int, RequestStream]) -> None:
        self._next_poll = time.monotonic() + self._poll_s
        for request in list(self._live.values()):
            try:
                cancelled = request.sink.is_cancelled()
            except Exception as exc:
                request.end(exc)
                cancelled = True
            if cancelled:
                if request.ending is None:
                    log.info(
                        "request %s cancelled after %d tokens",
                        request.request_id,
                        max((c.assembler.num_tokens for c in request.choices), default=0),
                    )
                    request.end("cancelled")
                self._closed.append(request)
                touched[id(request)] = request

    def _deliver(self, request: RequestStream) -> None:
        """What is due for one request: streamed chunks, then its choices' last chunks, or
        its one failure or cancellation."""
        sink, observed = request.sink, False
        try:
            if request.ending is None:
                due = (choice.due_chunk(self._interval) for choice in request.choices)
                outgoing = [chunk for chunk in due if chunk is not None] + request.finals
                request.finals = []
                for chunk in outgoing:
                    if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
                        chunk.prompt_logprobs = prompt_logprob_entries(
                            request.prompt_logprobs, self._texts
                        )
                        request.prompt_logprobs_sent = True
                    if chunk.final:  # counted before the client can see it
                        observed = self._finished(request, chunk.finish_reason)
                    sink.send(chunk)
                    self._stats.responses += 1
            elif self._live.pop(id(request), None) is not None:
                cancelled = request.ending == "cancelled"
                observed = self._finished(request, "cancelled" if cancelled else "error")
                if cancelled:
                    sink.cancelled()
                else:
                    sink.fail(request.ending)
        except Exception as exc:  # a sink that raises: its request fails, others go on
            log.warning("request %s: sending failed: %r", request.request_id, exc)
            if not request.closed:
                self._closed.append(request)  # the engine still runs it
            request.closed = True
            self._live.pop(id(request), None)
            if not observed:
                self._observe.finished("error")
            if request.ending is None:  # a chunk failed: the failure is the final call
                request.ending = exc
                try:
                    sink.fail(exc)
                except Exception:
                    log.exception("request %s: its failure could not be sent", request.request_id)

    def _finished(self, request: RequestStream, outcome: str) -> bool:
        self._live.pop(id(request), None)
        self._observe.finished(outcome)
        self._observe.request_ended(request, outcome)
        return True
