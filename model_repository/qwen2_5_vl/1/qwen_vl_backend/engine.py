"""Generation engine with in-flight batching.

One worker thread owns the model. New requests are prepared (images, chat template), prefilled
alone (vision encoder + prompt) and join the running decode batch at the next step boundary;
sequences that finish or are cancelled leave at once and their cache rows are freed. Each
sequence keeps its own sampler (seeded generator), stop strings and output stream.

Qwen2.5-VL specifics: positions are 3-D (mrope) and shifted by a per-sequence `rope_delta`
after images, so the engine passes `position_ids` itself on every forward instead of relying
on the `rope_deltas` the model keeps as state between calls; caches of different lengths are
merged by left padding, and the attention mask hides the padding.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .detokenize import TextAssembler
from .errors import EngineFullError, RequestError
from .prepare import PreparedRequest, RawRequest, prepare
from .sampling import TokenSampler, TokenTexts, choose_tokens, logprob_entry, resolve_sampling
from .settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass
class OutputChunk:
    """One response's worth of output; `finish_reason` is set on the last one only."""
    text: str
    num_tokens: int
    prompt_tokens: int
    image_tokens: int
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


class ResponseSink(Protocol):
    """Where one request's output goes. Exactly one final call: a chunk with a finish_reason,
    `fail` or `cancelled`."""

    def is_cancelled(self) -> bool: ...

    def send(self, chunk: OutputChunk) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> None: ...


class _Sequence:
    """One request being generated: sampler, text assembly and what it has sent."""

    def __init__(self, request: PreparedRequest, sink: ResponseSink, checkpoint: Checkpoint,
                 arrived: float):
        self.request = request
        self.sink = sink
        self.assembler = TextAssembler(checkpoint.decode, request.sampling.stop)
        settings = resolve_sampling(request.sampling, checkpoint.model.generation_config)
        self.sampler = TokenSampler(settings, request.inputs["input_ids"],
                                    checkpoint.model.config.text_config.vocab_size)
        self.eos = checkpoint.eos_token_ids
        self.max_model_len = checkpoint.max_model_len
        self.next_position = request.prompt_tokens  # text position of the next token fed in
        self.rope_delta = 0
        self.last_token: int | None = None
        self.logprobs: list[dict] = []
        self.unsent_logprobs: list[dict] = []
        self.started = arrived
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self._held = ("", 0)

    @property
    def reserved_tokens(self) -> int:
        return self.request.prompt_tokens + self.request.max_new_tokens

    def accept(self, token: int, logits: torch.Tensor, texts: TokenTexts) -> None:
        """Take the sampled token: stream its text, decide whether the sequence is done."""
        self.first_token_at = self.first_token_at or time.monotonic()
        self.last_token = token
        sampling = self.request.sampling
        if sampling.logprobs:
            entry = logprob_entry(logits, token, sampling.top_logprobs, texts)
            self.logprobs.append(entry)
            self.unsent_logprobs.append(entry)
        text, tokens = self.assembler.push(token)
        if token in self.eos or self.assembler.stopped:
            self.finish_reason = "stop"
        elif (self.assembler.num_tokens >= self.request.max_new_tokens
              or self.next_position + 1 >= self.max_model_len):
            self.finish_reason = "length"
        if self.finish_reason is None and self.request.raw.stream:
            if text:
                self.sink.send(self._chunk(text, tokens))
        else:  # the last token's text goes out with the final chunk
            self._held = (self._held[0] + text, self._held[1] + tokens)

    def finish(self) -> None:
        tail, tail_tokens = self.assembler.finish()
        text, tokens = self._held[0] + tail, self._held[1] + tail_tokens
        if not self.request.raw.stream:
            text, tokens = self.assembler.text, self.assembler.num_tokens
            self.unsent_logprobs = self.logprobs
            if not self.request.raw.exclude_input_in_output:
                text = self.request.prompt + text
        self.sink.send(self._chunk(text, tokens, self.finish_reason))
        elapsed = time.monotonic() - self.started
        log.info("request %s done: %d prompt (%d image) + %d completion tokens, finish_reason=%s, "
                 "ttft %.3fs, total %.3fs", self.request.raw.request_id, self.request.prompt_tokens,
                 self.request.image_tokens, self.assembler.num_tokens, self.finish_reason,
                 (self.first_token_at or time.monotonic()) - self.started, elapsed)

    def _chunk(self, text: str, tokens: int, finish_reason: str | None = None) -> OutputChunk:
        logprobs = self.unsent_logprobs if self.request.sampling.logprobs else None
        self.unsent_logprobs = []
        return OutputChunk(text, tokens, self.request.prompt_tokens, self.request.image_tokens,
                           finish_reason, logprobs)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - (dim % tensor.dim())) + [missing, 0]
    return F.pad(tensor, pad)


class _DecodeBatch:
    """The running sequences, their merged KV cache (left-padded) and attention mask."""

    def __init__(self, model):
        self._model = model
        self.sequences: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, sequence: _Sequence, cache, mask: torch.Tensor) -> None:
        if not self.sequences:
            self.sequences, self._cache, self._mask = [sequence], cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for ours, theirs in zip(self._cache.layers, cache.layers):
            ours.keys = torch.cat([_pad_left(ours.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            ours.values = torch.cat([_pad_left(ours.values, length, 2), _pad_left(theirs.values, length, 2)])
        self._mask = torch.cat([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)])
        self.sequences.append(sequence)

    def keep(self, rows: list[int]) -> None:
        """Drop every other row; trim columns that became padding in all remaining rows."""
        if not rows:
            self.sequences, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(rows, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self.sequences = [self.sequences[i] for i in rows]

    def forward(self) -> torch.Tensor:
        """One decode step for every sequence; the next-token logits, one row each."""
        device = self._mask.device
        batch = len(self.sequences)
        input_ids = torch.tensor([[s.last_token] for s in self.sequences], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        positions = torch.tensor([s.next_position + s.rope_delta for s in self.sequences], device=device)
        out = self._model(input_ids=input_ids, attention_mask=mask, cache=self._cache, use_cache=True,
                          position_ids=positions.view(1, batch, 1).expand(3, batch, 1))
        self._mask = mask
        for sequence in self.sequences:
            sequence.next_position += 1
        return out.logits[:, -1, :].float()


def prefill(model, request: PreparedRequest):
    """Run the prompt (and images) alone: (next-token logits, cache, mask, rope_delta)."""
    from transformers import DynamicCache

    inputs = request.inputs
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if inputs.get("image_grid_thw") is not None:
        positions, deltas = model.model.get_rope_index(
            input_ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask)
        delta = int(deltas.reshape(-1)[0])
    else:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
        delta = 0
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"), logits_to_keep=1)
    return out.logits[0, -1].float(), cache, mask, delta


class EngineObserver:
    """Hooks for metrics; called on the engine thread, so they must be quick."""

    def prefilled(self, prompt_tokens: int, image_tokens: int, time_to_first_token: float) -> None:
        pass

    def decoded(self, batch_size: int, waiting: int) -> None:
        pass

    def finished(self, outcome: str) -> None:
        """outcome: stop, length, cancelled or error."""


@dataclass
class EngineStats(EngineObserver):
    """Counters for tests and logs (read from other threads; ints are updated atomically)."""
    decode_steps: int = 0
    largest_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0

    def decoded(self, batch_size: int, waiting: int) -> None:
        self.decode_steps += batch_size > 0
        self.largest_batch = max(self.largest_batch, batch_size)

    def finished(self, outcome: str) -> None:
        if outcome == "cancelled":
            self.cancelled += 1
        elif outcome == "error":
            self.failed += 1
        else:
            self.completed += 1


class _Observers(EngineObserver):
    """Fans events out; a failing observer (metrics) is logged, never fatal to generation."""

    def __init__(self, *observers: EngineObserver):
        self._observers = observers

    def _call(self, method: str, *args) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("engine observer %s.%s failed", type(observer).__name__, method)

    def prefilled(self, *args) -> None:
        self._call("prefilled", *args)

    def decoded(self, *args) -> None:
        self._call("decoded", *args)

    def finished(self, *args) -> None:
        self._call("finished", *args)


class BatchingEngine:
    """In-flight batching over one model; bounded queue and cache budget in front."""

    def __init__(self, checkpoint: Checkpoint, settings: ModelSettings,
                 prepare_fn: Callable[..., PreparedRequest] = prepare,
                 observer: EngineObserver | None = None):
        self._checkpoint = checkpoint
        self._settings = settings
        self._prepare = prepare_fn
        self._texts = TokenTexts(checkpoint.tokenizer)
        self._queue: queue.Queue = queue.Queue(maxsize=settings.max_queued_requests)
        self._waiting: collections.deque[_Sequence] = collections.deque()  # prepared, no room yet
        self._batch = _DecodeBatch(checkpoint.model)
        self._stopping = threading.Event()
        self.stats = EngineStats()
        self._observe = _Observers(self.stats, observer or EngineObserver())
        self._thread = threading.Thread(target=self._run, name="qwen-vl-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._batch)

    def submit(self, raw: RawRequest, sink: ResponseSink) -> None:
        if self._stopping.is_set():
            raise EngineFullError("the model is shutting down")
        try:
            self._queue.put_nowait((raw, sink, time.monotonic()))
        except queue.Full:
            raise EngineFullError(
                f"{self._settings.max_queued_requests} requests are already waiting") from None

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop taking work, let running generations finish; False if they outlast `timeout`."""
        self._stopping.set()
        self._thread.join(self._settings.shutdown_timeout_s if timeout is None else timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        with torch.inference_mode():
            while not (self._stopping.is_set() and not self._batch and not self._waiting):
                try:
                    self._admit()
                    if self._batch:
                        self._step()
                        if not self._batch:  # idle now: gauges go back to zero
                            self._observe.decoded(0, self._queue.qsize() + len(self._waiting))
                except Exception:  # a bug here must not strand every running request
                    log.exception("engine step failed; failing the running requests")
                    self._fail_all()
            self._refuse_queued()

    # ---- admission ----------------------------------------------------------------------

    def _admit(self) -> None:
        while len(self._batch) < self._settings.max_batch_size:
            sequence = self._next_sequence(block=not self._batch)
            if sequence is None:
                return
            if not self._fits(sequence):
                self._waiting.appendleft(sequence)
                return
            self._start(sequence)

    def _next_sequence(self, block: bool) -> _Sequence | None:
        if self._waiting:
            return self._waiting.popleft()
        while not self._stopping.is_set():
            try:
                raw, sink, arrived = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                continue
            sequence = self._prepared(raw, sink, arrived)
            if sequence is not None:
                return sequence
        return None

    def _prepared(self, raw: RawRequest, sink: ResponseSink, arrived: float) -> _Sequence | None:
        try:
            if sink.is_cancelled():
                sink.cancelled()
                self._observe.finished("cancelled")
                return None
            request = self._prepare(raw, self._checkpoint, self._settings)
            sequence = _Sequence(request, sink, self._checkpoint, arrived)
            if sequence.reserved_tokens > self._settings.max_cache_tokens:
                raise RequestError(
                    f"the request needs {sequence.reserved_tokens} tokens of cache (prompt + "
                    f"max_tokens) but the server allows {self._settings.max_cache_tokens}",
                    "max_tokens", "context_length_exceeded")
            return sequence
        except Exception as exc:
            sink.fail(exc)
            self._observe.finished("error")
            return None

    def _fits(self, sequence: _Sequence) -> bool:
        reserved = sum(s.reserved_tokens for s in self._batch.sequences)
        return reserved + sequence.reserved_tokens <= self._settings.max_cache_tokens

    def _start(self, sequence: _Sequence) -> None:
        """Prefill, first token, then finish at once or join the batch; failures stay local."""
        try:
            logits, cache, mask, delta = prefill(self._checkpoint.model, sequence.request)
            sequence.rope_delta = delta
            token = choose_tokens(logits[None], [sequence.sampler])[0]
            sequence.accept(token, logits, self._texts)
            request = sequence.request
            self._observe.prefilled(request.prompt_tokens, request.image_tokens,
                                    sequence.first_token_at - sequence.started)
            if sequence.finish_reason:
                sequence.finish()
                self._observe.finished(sequence.finish_reason)
            else:
                self._batch.add(sequence, cache, mask)
        except Exception as exc:
            sequence.sink.fail(exc)
            self._observe.finished("error")

    # ---- decoding -----------------------------------------------------------------------

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._batch:
            return
        logits = self._batch.forward()
        sequences = self._batch.sequences
        self._observe.decoded(len(sequences), self._queue.qsize() + len(self._waiting))
        tokens = choose_tokens(logits, [s.sampler for s in sequences])
        keep = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            try:
                sequence.accept(token, logits[row], self._texts)
                if sequence.finish_reason:
                    sequence.finish()
                    self._observe.finished(sequence.finish_reason)
                else:
                    keep.append(row)
            except Exception as exc:  # one request's failure (e.g. its sink) is its own
                sequence.sink.fail(exc)
                self._observe.finished("error")
        if len(keep) < len(sequences):
            self._batch.keep(keep)

    def _drop_cancelled(self) -> None:
        keep = []
        for row, sequence in enumerate(self._batch.sequences):
            if sequence.sink.is_cancelled():
                log.info("request %s cancelled after %d tokens", sequence.request.raw.request_id,
                         sequence.assembler.num_tokens)
                sequence.sink.cancelled()
                self._observe.finished("cancelled")
            else:
                keep.append(row)
        if len(keep) < len(self._batch):
            self._batch.keep(keep)

    def _fail_all(self) -> None:
        for sequence in self._batch.sequences:
            sequence.sink.fail(RuntimeError("engine step failed"))
            self._observe.finished("error")
        self._batch.keep([])

    def _refuse_queued(self) -> None:
        while True:
            try:
                _raw, sink, _arrived = self._queue.get_nowait()
            except queue.Empty:
                return
            sink.fail(EngineFullError("the model is shutting down"))
