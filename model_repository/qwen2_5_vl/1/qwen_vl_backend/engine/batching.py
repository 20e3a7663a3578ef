"""Generation engine: a token-budget scheduler over a slot KV cache (continuous batching).

Requests are prepared (chat template, image decoding and resizing, the processor, mrope
positions) on a small worker pool; the engine thread only runs the model and samples. Each
engine step is one packed forward (see `kv_cache`): every running sequence's next token plus as
many prompt tokens of admitted requests as the step's token budget allows. So long prompts are
chunked across steps, short ones share a step, and a running stream never waits for more than
one budgeted step when requests arrive.

Qwen2.5-VL specifics:
- positions are 3-D (mrope) and shifted after images by a per-request `rope_delta`; prompt
  positions come from `get_rope_index` at preparation, decode positions are
  `next_position + rope_delta`, and the engine passes them on every forward (the model's own
  `rope_deltas` state would mix sequences up);
- the vision tower runs once on all uncached images of the requests admitted in one step (one
  call, repeated images come from the embedding cache), block by block over as many steps as
  the budget needs (`vision_stages`); a request's prompt chunks start once its images are
  encoded, and a chunk takes the embeddings of the image tokens it contains, so a chunk
  boundary may fall inside an image.

`n` > 1: the prompt is prefilled once, then its slot is copied into one slot per extra choice;
each choice samples with its own generator (seed + index when a seed is given).

Constrained output (`structured`): the grammar is compiled where the request is prepared (cached,
`grammar`); each sequence owns a matcher, and the step masks the logits of its constrained rows
before sampling (`grammar.TokenMasks`), so constrained and free sequences share a batch.

Priority classes (`contract.Priority`, docs/engine.md "Priority classes"): each class waits in a
queue of its own; a step plans prefill work class by class, interactive first (its prompt
chunks, the vision stages its requests wait for, its admissions), so batch prefill only gets
what interactive prefill leaves of the budget, and no batch request is admitted while an
interactive one waits. Batch sequences hold at most `max_batch_priority_slots` KV slots. Running
rows are never preempted, and a row's tokens never depend on its neighbours in any class.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import torch

from ..contract import Priority, Task
from ..errors import DeviceMemoryError, EngineFullError, EngineStoppingError, RequestError
from ..modeling.checkpoint import Checkpoint
from ..modeling.decoder import LeanDecoder
from ..modeling.vision_stages import VisionJob
from ..request.prepare import PreparedRequest, RawRequest, parse_priority, prepare
from ..request.tokenize import answer_task
from ..settings import ModelSettings
from .adapters import Adapter, AdapterRegistry, declared_adapters
from .embedding_cache import EmbeddingCache
from .grammar import CompiledGrammar, GrammarCompiler, GrammarFailure, TokenMasks
from .kv_cache import PrefillChunk, SlotKVCache, StepLayout, decode_length_multiple
from .memory import release_cached_memory, size_kv_cache, use_device
from .repetition import RepetitionGuard
from .responses import Failure, RequestStream, ResponseSender, ResponseSink, TaskSink, Token
from .sampling import TokenSampler, TokenTexts, resolve_sampling, sample, stop_tokens
from .slots import SlotContent, SlotPool
from .text_forward import text_forward
from .timings import RequestTimings, take_media_decode_seconds

log = logging.getLogger(__name__)

# Admission order of the classes (contract.Priority's order), and the one that pays last.
_RANK = {priority: rank for rank, priority in enumerate(Priority)}
_LAST_PRIORITY = list(Priority)[-1]

# Prompt positions whose logprobs one step computes for a request that asks for them
# (prompt_logprobs): its prompt chunks are cut to this many tokens, which bounds the step's
# logits at this many rows of the vocabulary (256 x 152k float32 = 156 MB for Qwen2.5-VL).
PROMPT_LOGPROB_ROWS = 256

OUT_OF_MEMORY = (
    "the device ran out of memory for this request; retry later, or with a shorter prompt, "
    "fewer or smaller images"
)


class EngineObserver:
    """Hooks for metrics; called on the engine thread (`finished` on the sender thread, just
    before the request's final call), so they must be quick."""

    def prefilled(
        self,
        prompt_tokens: int,
        image_tokens: int,
        time_to_first_token: float,
        video_tokens: int = 0,
    ) -> None:
        pass

    def decoded(self, batch_size: int, waiting: int) -> None:
        pass

    def admitted(self, priority: str) -> None:
        """A request of this `Priority` class joined the batch."""

    def waiting_by_priority(self, waiting: dict[str, int]) -> None:
        """Requests submitted and not yet admitted, per `Priority` class (with `decoded`)."""

    def finished(self, outcome: str) -> None:
        """outcome: stop, length, cancelled or error."""

    def images_encoded(self, cache_hits: int, cache_misses: int) -> None:
        pass

    def constrained(self, kind: str) -> None:
        """A request with a `structured` constraint (json_object, json_schema, tool_calls) was
        accepted; called on a preparation thread."""

    def grammar_compiled(self, seconds: float) -> None:
        """A grammar was compiled (a cache miss); called on a preparation thread."""

    def repetition_detected(self) -> None:
        """The repetition guard ended a choice (docs/engine.md "Repetition guard")."""

    def host_timings(self, increase: dict[str, float]) -> None:
        """How much the host path timers (`EngineStats.timings`) grew since the last call:
        every `timing_log_s` under load and whenever the engine goes idle."""

    def request_ended(self, request: RequestStream, outcome: str) -> None:
        """A request that reached the batch ended (`finished`'s outcome), on the sender
        thread: its `timings` are complete (engine/tracing.py builds its spans from them)."""


class _Request:
    """A prepared request and its choices, as the engine sees it; `stream` is the sender's side
    (text, responses, cancellation), `emit` queues an event for the sender."""

    def __init__(
        self,
        prepared: PreparedRequest,
        sink: ResponseSink,
        arrived: float,
        emit: Callable,
        grammar: CompiledGrammar | None = None,
        priority: Priority = Priority.INTERACTIVE,
        guard: tuple[int, int] | None = None,
        adapter: Adapter | None = None,
    ):
        self.prepared = prepared
        self.adapter = adapter  # its LoRA adapter; None: the base weights
        self.adapter_slot: int | None = None  # the slot it pinned at admission
        self.arrived = arrived
        self.priority = priority
        self.grammar = grammar  # its `structured` constraint, compiled
        self.guard = guard  # (ngram, max_repeats) of its repetition guard; None: none
        self.stream = RequestStream(prepared, sink, arrived)
        self.timings = self.stream.timings = RequestTimings(arrived)
        self.choices: list[_Sequence] = []
        self.done = False  # failed, or ended by the sender: nothing more is computed for it
        self._emit = emit

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._emit(Failure(self.stream, error))


def _arrival(request: _Request) -> float:
    return request.arrived


def _lora_slot(sequence: _Sequence) -> int:
    return sequence.lora_slot


class _Sequence:
    """One choice being generated: its slot, sampler, grammar matcher and where it stands;
    `stream` assembles its text on the sender thread."""

    def __init__(
        self,
        request: _Request,
        checkpoint: Checkpoint,
        sampler: TokenSampler,
        slot: int,
        index: int = 0,
        matcher=None,
        adapter_slot: int | None = None,
    ):
        prepared = request.prepared
        self.request = request
        # the adapter slot it pins (None: base); its text rows use it if the adapter adapts text
        self.adapter_slot = adapter_slot
        adapter = request.adapter
        self.lora_slot = -1 if adapter is None else adapter.text_slot(adapter_slot)
        self.prepared = prepared
        self._checkpoint = checkpoint
        self.slot = slot
        self.index = index
        self.sampler = sampler
        self.matcher = matcher  # llguidance.LLMatcher of its own when the request is constrained
        sampling = prepared.sampling
        decode = checkpoint.decode
        if not sampling.skip_special_tokens:
            decode = functools.partial(checkpoint.decode, skip_special_tokens=False)
        self.stream = request.stream.choice(index, decode)
        # The tokens that end the choice (EOS unless ignore_eos, stop_token_ids); one that did
        # is left out of the text (`hidden`) unless include_stop_str_in_output.
        self.stop_tokens = frozenset(stop_tokens(sampling, checkpoint.eos_token_ids))
        self.hidden = False
        self.guard = None if request.guard is None else RepetitionGuard(*request.guard)
        self.max_model_len = checkpoint.max_model_len
        self.cached = 0  # tokens of this sequence in its slot
        self.next_position = prepared.prompt_tokens  # text position of the next token fed in
        self.last_token: int | None = None
        self.generated = 0  # tokens sampled
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        # While prefilling: each image's vision-tower output (None until its job is done), and
        # all of them joined once every one is there.
        self.image_parts: list[torch.Tensor | None] = []
        self.image_embeddings: torch.Tensor | None = None
        self.awaiting: list[_VisionWork] = []  # vision jobs encoding its missing images
        self.queued_keys: set[bytes] = set()  # its missing images no job has taken yet

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prepared.prompt_tokens

    @property
    def vision_ready(self) -> bool:
        return not self.image_parts or self.image_embeddings is not None

    def vision_ready_this_step(self) -> bool:
        """Ready now, or the last stages of every job it waits for run in this step (before
        the forward), so its first chunk can go in the same step."""
        return self.vision_ready or (
            not self.queued_keys and all(work.unplanned == 0 for work in self.awaiting)
        )

    def take_image(self, key: bytes, embeddings: torch.Tensor) -> None:
        for i, k in enumerate(self.prepared.image_keys):
            if k == key and self.image_parts[i] is None:
                self.image_parts[i] = embeddings
        if (
            self.image_parts
            and self.image_embeddings is None
            and all(p is not None for p in self.image_parts)
        ):
            self.image_embeddings = torch.cat(self.image_parts)

    def fork(self, slot: int, index: int) -> _Sequence:
        seed = self.prepared.sampling.seed
        sampler = self.sampler.fork(None if seed is None else seed + index)
        matcher = None if self.matcher is None else self.matcher.deep_copy()
        twin = _Sequence(
            self.request, self._checkpoint, sampler, slot, index, matcher, self.adapter_slot
        )
        twin.cached = self.cached
        return twin

    def accept(self, token: int) -> None:
        """Take the sampled token: advance the grammar, decide whether the choice is done by
        a stop token (EOS, stop_token_ids), a grammar that can take nothing but EOS, the
        repetition guard (finish_reason "repetition" here: "stop" with repetition_detected
        in the response) or length; stop tokens and the guard only from min_tokens on (stop
        strings are found where the text is assembled, `responses`)."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = self.stream.first_token_at = now
        self.last_token = token
        self.generated += 1
        self.request.timings.token(now, self.generated)
        grammar_done = False
        if self.matcher is not None:
            if not self.matcher.consume_token(token):
                raise GrammarFailure(
                    f"the grammar refused token {token}: {self.matcher.get_error()[:300]}"
                )
            grammar_done = self.matcher.is_stopped()
        min_tokens = self.prepared.sampling.min_tokens
        stop_token = token in self.stop_tokens and self.generated > min_tokens
        looping = self.guard is not None and self.guard.push(token)
        if stop_token or grammar_done:
            self.finish_reason = "stop"
            self.hidden = stop_token and not self.prepared.sampling.include_stop_str_in_output
        elif looping and self.generated >= min_tokens:
            self.finish_reason = "repetition"
        elif (
            self.generated >= self.prepared.max_new_tokens
            or self.next_position + 1 >= self.max_model_len
        ):
            self.finish_reason = "length"


@dataclass
class EngineStats(EngineObserver):
    """Counters for tests and logs (read from other threads; ints are updated atomically)."""

    decode_steps: int = 0
    largest_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens a freed slot still held (not prefilled)
    largest_step_tokens: int = 0  # decode + prompt tokens of the biggest forward
    partial_chunks: int = 0  # prompt chunks that left the rest of their prompt for later steps
    constrained_requests: int = 0
    grammar_compiles: int = 0
    repetition_stops: int = 0  # choices the repetition guard ended
    # Host path timers, cumulative seconds (docs/engine.md "Host path"). Engine thread: `steps`
    # iterations that computed something took `step_s` in all, of which scheduling (dropping
    # ended requests, admission, planning), vision-tower stages, the forward (LM head
    # included), sampling (grammar masks, sampling, logprobs, the one device→host copy) and
    # output (accepting tokens, finish checks, slot release, posting to the sender).
    # Sender thread: detokenizing and building responses, sends, cancellation polls.
    steps: int = 0
    step_s: float = 0.0
    scheduling_s: float = 0.0
    vision_s: float = 0.0
    forward_s: float = 0.0
    sampling_s: float = 0.0
    output_s: float = 0.0
    detokenize_s: float = 0.0
    send_s: float = 0.0
    cancellation_s: float = 0.0
    responses: int = 0  # responses sent (chunks and finals)
    vision_jobs: int = 0  # vision-tower jobs started
    largest_vision_patches: int = 0  # patches of the largest vision job
    out_of_memory: int = 0  # out-of-memory errors survived (a smaller step, failed requests)
    sender_wakeups: int = 0  # times the sender took what was queued
    coalesced_steps: int = 0  # steps whose output went out with a later step's
    # Requests admitted per Priority class, and the most KV slots batch-class requests held
    # at once (their choices' promised slots included).
    admitted_by_priority: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Priority, 0))
    largest_batch_priority_slots: int = 0

    def timings(self) -> dict[str, float]:
        """A snapshot of the host path timers and counters (a benchmark diffs two)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name.endswith("_s")
            or f.name in ("steps", "responses", "sender_wakeups", "coalesced_steps")
        }

    def decoded(self, batch_size: int, waiting: int) -> None:
        self.decode_steps += batch_size > 0
        self.largest_batch = max(self.largest_batch, batch_size)

    def admitted(self, priority: str) -> None:
        self.admitted_by_priority[priority] += 1

    def finished(self, outcome: str) -> None:
        if outcome == "cancelled":
            self.cancelled += 1
        elif outcome == "error":
            self.failed += 1
        else:
            self.completed += 1

    def images_encoded(self, cache_hits: int, cache_misses: int) -> None:
        self.image_cache_hits += cache_hits
        self.image_cache_misses += cache_misses

    def constrained(self, kind: str) -> None:
        self.constrained_requests += 1

    def grammar_compiled(self, seconds: float) -> None:
        self.grammar_compiles += 1

    def repetition_detected(self) -> None:
        self.repetition_stops += 1


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

    def admitted(self, *args) -> None:
        self._call("admitted", *args)

    def waiting_by_priority(self, *args) -> None:
        self._call("waiting_by_priority", *args)

    def finished(self, *args) -> None:
        self._call("finished", *args)

    def images_encoded(self, *args) -> None:
        self._call("images_encoded", *args)

    def constrained(self, *args) -> None:
        self._call("constrained", *args)

    def grammar_compiled(self, *args) -> None:
        self._call("grammar_compiled", *args)

    def repetition_detected(self, *args) -> None:
        self._call("repetition_detected", *args)

    def host_timings(self, *args) -> None:
        self._call("host_timings", *args)

    def request_ended(self, *args) -> None:
        self._call("request_ended", *args)


def _content(request: _Request, length: int) -> SlotContent:
    """The first `length` prompt tokens of a request, as a slot holds them (under its
    adapter's weights: another adapter's keys and values differ)."""
    prepared = request.prepared
    images = tuple(
        (start, key)
        for start, key in zip(prepared.image_starts, prepared.image_keys)
        if start < length
    )
    adapter = None if request.adapter is None else request.adapter.digest
    return SlotContent(prepared.inputs["input_ids"][0, :length], images, adapter)


def _adapter_image_key(key: bytes, adapter: Adapter) -> bytes:
    """An image's cache key under a vision adapter: its embeddings are the adapter's own."""
    return hashlib.sha256(adapter.digest.encode() + key).digest()


def _image_token_cost(model) -> float:
    """What one merged image token costs in the vision tower, in prompt tokens of the text
    model, estimated by the weights each passes through: a merged token is
    `spatial_merge_size²` patches through the patch embedding and the blocks, then the merger.
    (An estimate: on the bench checkpoint the tower ran ~1.5x slower than this says.)"""
    visual, text = model.model.visual, model.model.language_model
    weights = lambda module: sum(t.numel() for t in [*module.parameters(), *module.buffers()])  # noqa: E731
    per_token = visual.spatial_merge_size**2 * (
        weights(visual.patch_embed) + weights(visual.blocks)
    ) + weights(visual.merger)
    return per_token / max(1, weights(text.layers))


class _VisionCost:
    """How much a budget unit of vision-tower work really costs next to a prompt token,
    measured as the engine runs (moving averages), so a step's vision share takes about the
    time its budget says. The weight-count estimate alone was ~2x low on the development CPU
    (the tower's narrow matrices and window attention run below the text model's FLOP rate).
    Measured on CPU only: on a GPU, kernels run asynchronously and the estimate stands."""

    def __init__(self, measure: bool):
        self._measure = measure
        self._token_s: float | None = None
        self._unit_s: float | None = None

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def forward_took(self, tokens: int, seconds: float) -> None:
        if self._measure and tokens >= 32:  # prompt-sized: the per-token cost dominates
            self._token_s = self._average(self._token_s, seconds / tokens)

    def vision_took(self, units: int, seconds: float) -> None:
        if self._measure and units:
            self._unit_s = self._average(self._unit_s, seconds / units)

    @property
    def factor(self) -> float:
        if self._token_s is None or self._unit_s is None:
            return 1.0
        return min(8.0, max(0.25, self._unit_s / self._token_s))


@dataclass
class _Step:
    """What one engine step computes: vision-tower stages, then one forward of the decode
    tokens followed by prompt chunks."""

    decode: list[_Sequence]
    chunks: list[tuple[_Sequence, int, int]]  # (sequence, start, length)
    vision: list[tuple[_VisionWork, int]]  # (job, stages to run)
    # (sequence, first position, count) of prompt positions whose logprobs the forward's
    # extra rows carry (prompt_logprobs), after the sampling rows
    prompt_rows: list[tuple[_Sequence, int, int]] = field(default_factory=list)


class _VisionWork:
    """One vision-tower call over queued uncached images, within the patch budget."""

    def __init__(
        self, job: VisionJob, keys: list[bytes], cost: float, patches: int, pins: list[int]
    ):
        self.job = job
        self.keys = keys
        self.pins = pins  # adapter slots it holds until it is done (its images' adapters)
        self.patches = patches
        self.planned = 0  # stages scheduled so far
        self.stage_cost = max(1, round(cost / job.stages))  # prompt-token units per stage

    @property
    def unplanned(self) -> int:
        return self.job.stages - self.planned


class BatchingEngine:
    """Continuous batching over one model: worker-pool preparation, token-budget steps."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        settings: ModelSettings,
        prepare_fn: Callable[..., PreparedRequest] = prepare,
        observer: EngineObserver | None = None,
        tracer: EngineObserver | None = None,
        model_dir: str | None = None,
    ):
        """`model_dir`: the model version folder (relative adapter directories, its
        multi_lora.json and loras/ folder)."""
        settings = size_kv_cache(settings, checkpoint.model, checkpoint.max_model_len)
        self._checkpoint = checkpoint
        self._settings = settings
        self._prepare = prepare_fn
        self._texts = TokenTexts(checkpoint.tokenizer)
        self._model = checkpoint.model
        self.slot_len = min(
            checkpoint.max_model_len, settings.max_cache_tokens // settings.max_batch_size
        )
        self._cache = SlotKVCache.for_model(self._model, settings.max_batch_size, self.slot_len)
        # what a request may ask for; one sequence holds at most a slot of tokens
        self.limits = settings.limits(context_length=self.slot_len)
        self._slots = SlotPool(settings.max_batch_size)
        self._step_tokens = settings.step_tokens(str(checkpoint.device))
        declared = declared_adapters(settings, model_dir)
        lora_slots = settings.max_loras if declared or settings.lora_root_dirs() else 0
        self._text_forward = text_forward(
            self._model, str(checkpoint.device), settings, self._largest_step_tokens(), lora_slots
        )
        self.adapters = self._adapter_registry(declared, lora_slots)
        self._adapter_wait = False  # admission stopped for an adapter being read
        self._length_multiple = decode_length_multiple(str(checkpoint.device))
        # The vision tower's device: the checkpoint's, unless a device_map put it elsewhere.
        weight = next(self._model.model.visual.parameters(), None)
        self._vision_device = checkpoint.device if weight is None else weight.device
        self._images = EmbeddingCache(settings.image_cache_mb * 2**20)
        self._vision: list[_VisionWork] = []  # vision-tower jobs in progress, oldest first
        self._encoding: dict[bytes, _VisionWork] = {}  # image key → the job encoding it
        # no job yet: each image's tower input and the adapter slot it runs with (-1: base)
        self._image_queue: dict[bytes, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._image_priority: dict[bytes, Priority] = {}  # the first class a queued image serves
        self._image_token_cost = _image_token_cost(self._model)
        self._vision_cost = _VisionCost(measure=str(checkpoint.device) == "cpu")
        self._pool = ThreadPoolExecutor(
            max(1, settings.preprocess_workers),
            thread_name_prefix="qwen-vl-prep",
            initializer=use_device,
            initargs=(checkpoint.device,),
        )
        self._ready: queue.Queue[_Request] = queue.Queue()  # prepared, not admitted
        # Taken from _ready, no room yet: a queue per class, each in order of submission.
        self._waiting: dict[Priority, list[_Request]] = {p: [] for p in Priority}
        # Submitted and not yet admitted or refused, per class (each bounded by
        # max_queued_requests, so a batch backlog never makes an interactive request busy).
        self._unadmitted = dict.fromkeys(Priority, 0)
        self._batch_slots = settings.batch_priority_slots(settings.max_batch_size)
        self._lock = threading.Lock()
        self._running: list[_Sequence] = []  # in slot order of admission: prefilling and decoding
        self._stopping = threading.Event()
        self.stats = EngineStats()
        # `tracer` (engine/tracing.py) only when tracing is on: off, nothing more is called
        extra = (tracer,) if tracer is not None else ()
        self._observe = _Observers(self.stats, observer or EngineObserver(), *extra)
        self._sender = ResponseSender(
            self._texts,
            settings.stream_interval,
            settings.cancel_poll_ms / 1000,
            self._observe,
            self.stats,
        )
        self._outbox: list = []  # this step's events for the sender, posted once per step
        self._timings_logged = (time.monotonic(), self.stats.timings())
        vocab_size = self._model.config.text_config.vocab_size
        self.grammars = GrammarCompiler(
            checkpoint.tokenizer,
            vocab_size,
            checkpoint.eos_token_ids,
            self.limits,
            settings.grammar_cache_mb * 2**20,
            on_compiled=self._observe.grammar_compiled,
        )
        self._masks = TokenMasks(vocab_size)
        log.info(
            "KV cache: %d slots x %d tokens (%.1f MiB), batch priority up to %d; %d tokens per step",
            settings.max_batch_size,
            self.slot_len,
            self._cache.bytes / 2**20,
            self._batch_slots,
            self._step_tokens,
        )
        self._thread = threading.Thread(target=self._run, name="qwen-vl-engine", daemon=True)
        self._thread.start()

    def _adapter_registry(self, declared: dict, slots: int) -> AdapterRegistry:
        """The adapters; their text stacks live in the lean decoder (compiled with them)."""
        forward = self._text_forward
        text = forward.lora if isinstance(forward, LeanDecoder) else None
        if slots and text is None:
            raise ValueError("LoRA adapters need the lean forward (parameter forward: lean)")
        if declared and not slots:
            raise ValueError(f"LoRA adapters {sorted(declared)} are declared but max_loras is 0")
        return AdapterRegistry(self._model, self._settings, declared, text)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, raw: RawRequest, sink: ResponseSink) -> None:
        if self._stopping.is_set():
            raise EngineStoppingError("the model is shutting down")
        priority = parse_priority(raw.priority)
        with self._lock:
            if self._unadmitted[priority] >= self._settings.max_queued_requests:
                raise EngineFullError(
                    f"{self._settings.max_queued_requests} {priority} requests are already waiting"
                )
            self._unadmitted[priority] += 1
        self._pool.submit(self._prepared, raw, sink, time.monotonic(), priority)

    def submit_task(self, task: Task, raw: RawRequest, sink: TaskSink) -> None:
        """A request for a task other than generation (tokenize, detokenize): answered on the
        preparation pool, through the rendering a generation's preparation does, with no KV
        slot and no engine step."""
        if self._stopping.is_set():
            raise EngineStoppingError("the model is shutting down")
        if task in (Task.LIST_LORAS, Task.LOAD_LORA, Task.UNLOAD_LORA):
            self.adapters.submit_task(task, raw, sink)
        else:
            self._pool.submit(self._answer_task, task, raw, sink)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop taking work, let running generations finish; False if they outlast `timeout`."""
        self._stopping.set()
        self._thread.join(self._settings.shutdown_timeout_s if timeout is None else timeout)
        finished = not self._thread.is_alive()
        if finished:
            self._pool.shutdown(wait=False)
            self.adapters.shutdown()
        return finished

    # ---- preparation (worker threads) ---------------------------------------------------

    def _prepared(
        self, raw: RawRequest, sink: ResponseSink, arrived: float, priority: Priority
    ) -> None:
        try:
            if sink.is_cancelled():
                self._refused(priority)
                sink.cancelled()
                self._observe.finished("cancelled")
                return
            started = time.monotonic()
            adapter = self.adapters.resolve(raw.lora)
            if adapter is not None:
                self.adapters.prefetch(adapter)  # read while the request is prepared
            take_media_decode_seconds()  # what this thread decoded before is not this request's
            prepared = self._prepare(raw, self._checkpoint, self._settings)
            if adapter is not None and adapter.vision:
                prepared.image_keys = [_adapter_image_key(k, adapter) for k in prepared.image_keys]
            self._check_fits(prepared, priority)
            structured, grammar = prepared.sampling.structured, None
            if structured is not None:
                grammar = self.grammars.compile(structured)
                self._observe.constrained(structured.type)
            guard = self._repetition_guard(prepared)
            request = _Request(
                prepared, sink, arrived, self._outbox_append, grammar, priority, guard, adapter
            )
            timings = request.timings
            timings.prepare_started, timings.prepared = started, time.monotonic()
            timings.media_decode = take_media_decode_seconds()
            self._sender.register(request.stream)
            self._ready.put(request)
        except Exception as exc:
            self._refused(priority)
            sink.fail(exc)
            self._observe.finished("error")

    def _answer_task(self, task: Task, raw: RawRequest, sink: TaskSink) -> None:
        try:
            self.adapters.resolve(raw.lora)  # an unknown adapter is not_found here too
            text = answer_task(
                task, raw, self._checkpoint, self._settings, self.limits.context_length
            )
        except Exception as exc:
            sink.fail(exc)
            return
        try:
            sink.answer(text)
        except Exception:  # the client is gone, or Triton refused the response
            log.exception("request %s: its %s answer could not be sent", raw.request_id, task)

    def _refused(self, priority: Priority) -> None:
        with self._lock:
            self._unadmitted[priority] -= 1

    def _repetition_guard(self, prepared: PreparedRequest) -> tuple[int, int] | None:
        """(ngram, max_repeats) of the request's repetition guard, or the server's default
        when it names none; None when off."""
        guard = prepared.sampling.repetition_guard
        if guard is None:
            settings = self._settings
            ngram, repeats = settings.repetition_guard_ngram, settings.repetition_guard_max_repeats
        else:
            ngram, repeats = guard.ngram, guard.max_repeats
        return (ngram, repeats) if ngram > 0 else None

    def _check_fits(self, prepared: PreparedRequest, priority: Priority) -> None:
        sampling = prepared.sampling
        vocab = self._model.config.text_config.vocab_size
        for param, token in sampling.token_ids():
            if token >= vocab:
                raise RequestError(
                    f"{token} is not a token id of this model (0 to {vocab - 1})", param
                )
        if sampling.min_tokens > prepared.max_new_tokens:
            raise RequestError(
                f"'min_tokens' must be at most max_tokens ({prepared.max_new_tokens})",
                "min_tokens",
            )
        n, cap = prepared.sampling.n, self.limits.max_choices
        if n > cap:
            raise RequestError(f"'n' must be at most {cap} on this server", "n")
        if priority is Priority.BATCH and n > self._batch_slots:  # it could never be admitted
            raise RequestError(
                f"'n' must be at most {self._batch_slots} for {priority}-priority requests on "
                "this server",
                "n",
            )
        needed = prepared.prompt_tokens + prepared.max_new_tokens
        if needed > self.slot_len:
            raise RequestError(
                f"the request needs {needed} tokens of cache (prompt + max_tokens) but the server "
                f"allows {self.slot_len} per sequence",
                "max_tokens",
                "context_length_exceeded",
            )

    # ---- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        use_device(self._checkpoint.device)
        with torch.inference_mode():
            while not (self._stopping.is_set() and self._idle()):
                try:
                    idle = not self._running and (not self._any_waiting() or self._adapter_wait)
                    self._take_ready(block=idle)
                    self._step()
                except Exception:  # a bug here must not strand every running request
                    log.exception("engine step failed; failing the running requests")
                    self._fail_running()
                    self._post()
            self._refuse_waiting()
            self._post()
        self._sender.close()

    def _step(self) -> None:
        stats = self.stats
        started = time.perf_counter()
        self._drop_cancelled()
        step = self._schedule()
        stats.scheduling_s += time.perf_counter() - started
        if step.decode or step.chunks or step.vision:
            self._execute(step)
        if not self._running:  # idle now: gauges go back to zero
            self._observe.decoded(0, self._waiting_count())
            self._observe.waiting_by_priority(self._waiting_by_priority())
        self._post()
        if step.decode or step.chunks or step.vision:
            stats.steps += 1
            stats.step_s += time.perf_counter() - started
            self._report_timings(idle=not self._running)

    def _outbox_append(self, event) -> None:
        self._outbox.append(event)

    def _post(self) -> None:
        """The step's events go to the sender in one hand-over."""
        if self._outbox:
            self._sender.post(self._outbox)
            self._outbox = []

    def _report_timings(self, idle: bool) -> None:
        """Every `timing_log_s`, and when the engine goes idle (so a reading taken then covers
        every step), the timers' increase to the observers and, as a mean per step, to the
        debug log."""
        period = self._settings.timing_log_s
        since, before = self._timings_logged
        if period <= 0 or (not idle and time.monotonic() - since < period):
            return
        now = self.stats.timings()
        self._timings_logged = (time.monotonic(), now)
        increase = {name: now[name] - before[name] for name in now}
        self._observe.host_timings(increase)
        if log.isEnabledFor(logging.DEBUG):
            steps = max(1, increase["steps"])
            per_step = ", ".join(
                f"{name[:-2]} {1e3 * value / steps:.3f}"
                for name, value in increase.items()
                if name.endswith("_s")
            )
            log.debug("host path, ms per step over %d steps: %s", steps, per_step)

    def _idle(self) -> bool:
        with self._lock:
            unadmitted = sum(self._unadmitted.values())
            return not self._running and not self._any_waiting() and unadmitted == 0

    def _any_waiting(self) -> bool:
        return any(self._waiting.values())

    def _waiting_count(self) -> int:
        with self._lock:
            return sum(self._unadmitted.values())

    def _waiting_by_priority(self) -> dict[str, int]:
        with self._lock:
            return dict(self._unadmitted)

    def _take_ready(self, block: bool) -> None:
        try:
            if block:
                self._wait_for(self._ready.get(timeout=0.05))
            while True:
                self._wait_for(self._ready.get_nowait())
        except queue.Empty:
            pass

    def _wait_for(self, request: _Request) -> None:
        if request.stream.closed:  # cancelled before it got here
            self._refused(request.priority)
        else:
            # In order of submission: preparation runs on several threads and may finish out of it.
            bisect.insort(self._waiting[request.priority], request, key=_arrival)

    def _drop_cancelled(self) -> None:
        """Sequences and waiting requests the sender ended (cancelled, a failed send, a stop
        string) leave; the sender polls cancellation, so this costs nothing most steps."""
        if not self._sender.take_closed():
            return
        for waiting in self._waiting.values():
            for request in [r for r in waiting if r.stream.closed]:
                waiting.remove(request)
                self._refused(request.priority)
                request.done = True
        for sequence in self._running:
            if sequence.request.stream.closed:
                sequence.request.done = True
        self._retire(
            [s for s in self._running if s.request.done or s.stream.finished],
        )

    # ---- scheduling ---------------------------------------------------------------------

    def _schedule(self) -> _Step:
        """Every running sequence's decode token, then prefill work within the step budget,
        class by class in `Priority` order: the class's prompt chunks of admitted requests
        (oldest first), the vision-tower stages it waits for, its admissions (none while an
        earlier class still waits), their images' vision job and first chunks. So interactive
        prefill is paid first and batch prefill gets what it leaves. A quarter of the budget is
        kept for prefill work however many sequences decode, so arrivals always make progress."""
        decode = [s for s in self._running if not s.prefilling]
        if any(s.lora_slot >= 0 for s in decode):  # each adapter's rows in one segment
            decode.sort(key=_lora_slot)
        budget = max(self._step_tokens - len(decode), self._step_tokens // 4)
        step = _Step(decode, [], [])
        self._adapter_wait = False
        held_back = False  # an earlier class still waits for room: later classes wait too
        for priority in Priority:
            for sequence in self._running:
                if (
                    budget > 0
                    and sequence.prefilling
                    and sequence.request.priority is priority
                    and sequence.vision_ready_this_step()
                ):
                    budget -= self._plan_chunk(step, sequence, budget)
            for work in self._vision_jobs_paid_by(priority, step):
                budget -= self._plan_stages(step, work, budget)
            admitted = [] if held_back else self._admit_waiting(priority, budget)
            held_back = held_back or bool(self._waiting[priority])
            if admitted:
                self._queue_images(admitted, priority)
            work = self._next_vision_job(priority)
            if work is not None:
                budget -= self._plan_stages(step, work, budget)
            for sequence in admitted:
                if budget > 0 and sequence.vision_ready_this_step():
                    budget -= self._plan_chunk(step, sequence, budget)
        return step

    def _vision_jobs_paid_by(self, priority: Priority, step: _Step) -> list[_VisionWork]:
        """The vision jobs in progress, not yet planned this step, whose stages `priority`'s
        share of the budget pays for: those its prefilling sequences wait for; all of them
        when images of this class wait in the queue for the patch room they hold (a batch job
        holds interactive images back no longer than its own stages take), or when this is
        the last class (a job no sequence waits for any more still finishes and frees its room)."""
        planned = {id(work) for work, _ in step.vision}
        jobs = [work for work in self._vision if id(work) not in planned]
        if priority is _LAST_PRIORITY or priority in self._image_priority.values():
            return jobs
        awaited = {
            id(work)
            for sequence in self._running
            if sequence.request.priority is priority and sequence.prefilling
            for work in sequence.awaiting
        }
        return [work for work in jobs if id(work) in awaited]

    def _admit_waiting(self, priority: Priority, budget: int) -> list[_Sequence]:
        """`priority`'s waiting requests, oldest first, while the step has budget and the next
        one's choices find free slots, within the class's share of the slots (all of them for
        interactive, `max_batch_priority_slots` for batch). The first that does not fit waits
        at the head: nothing overtakes it within its class."""
        waiting, admitted = self._waiting[priority], []
        room = len(self._slots) - self._promised_slots()
        if priority is Priority.BATCH:
            room = min(room, self._batch_slots - self._slots_held(priority))
        while waiting and budget > 0:
            n = waiting[0].prepared.sampling.n
            if n > room:
                break
            adapter_slot = self._adapter_slot(waiting[0])
            if adapter_slot is False:
                continue  # it failed
            if adapter_slot is None and waiting[0].adapter is not None:
                self._adapter_wait = True
                break  # its adapter is being read, or every slot is pinned
            room -= n
            waiting[0].adapter_slot = adapter_slot
            admitted.append(self._admit(waiting.pop(0)))
        if admitted and priority is Priority.BATCH:
            self.stats.largest_batch_priority_slots = max(
                self.stats.largest_batch_priority_slots, self._slots_held(priority)
            )
        return admitted

    def _adapter_slot(self, request: _Request) -> int | None | bool:
        """The pinned adapter slot for the head of a queue: None for the base weights or while
        its adapter is not resident yet, False when it failed (gone from the queue)."""
        if request.adapter is None:
            return None
        try:
            return self.adapters.acquire(request.adapter)
        except RequestError as exc:
            self._waiting[request.priority].remove(request)
            self._refused(request.priority)
            request.fail(exc)
            return False

    def _slots_held(self, priority: Priority) -> int:
        """KV slots the running sequences of a class hold, their choices' promised ones too."""
        return sum(
            s.prepared.sampling.n if s.index == 0 and s.prefilling else 1
            for s in self._running
            if s.request.priority is priority
        )

    def _promised_slots(self) -> int:
        """Free slots already promised: an admitted request with n > 1 takes its extra choices'
        slots when its prompt is prefilled (`_forked`), so they must stay free until then."""
        return sum(
            s.prepared.sampling.n - 1 for s in self._running if s.index == 0 and s.prefilling
        )

    def _largest_step_tokens(self) -> int:
        """The most tokens `_schedule` can put in one forward: every slot decoding plus the
        quarter of the budget kept for prefill, or the whole budget."""
        return max(self._step_tokens, self._settings.max_batch_size + self._step_tokens // 4)

    @staticmethod
    def _plan_chunk(step: _Step, sequence: _Sequence, budget: int) -> int:
        length = min(sequence.prepared.prompt_tokens - sequence.cached, budget)
        if sequence.prepared.sampling.prompt_logprobs is not None:
            length = min(length, PROMPT_LOGPROB_ROWS)
        step.chunks.append((sequence, sequence.cached, length))
        return length

    def _plan_stages(self, step: _Step, work: _VisionWork, budget: int) -> int:
        """As many stages as the budget pays for; one at least when the step has no other
        prefill work, so a tower costlier than the budget still finishes."""
        stage_cost = max(1, round(work.stage_cost * self._vision_cost.factor))
        stages = min(work.unplanned, max(budget, 0) // stage_cost)
        if stages == 0 and work.unplanned and not step.chunks and not step.vision:
            stages = 1
        if stages:
            step.vision.append((work, stages))
            work.planned += stages
        return stages * stage_cost

    def _admit(self, request: _Request) -> _Sequence:
        with self._lock:
            self._unadmitted[request.priority] -= 1
        self._observe.admitted(request.priority)
        prepared = request.prepared
        request.timings.admitted = time.monotonic()
        settings = resolve_sampling(
            prepared.sampling, self._model.generation_config, self._checkpoint.eos_token_ids
        )
        sampler = TokenSampler(
            settings,
            prepared.inputs["input_ids"].to(self._checkpoint.device),
            self._model.config.text_config.vocab_size,
        )
        slot, reused = self._slots.take(_content(request, prepared.prompt_tokens))
        matcher = None if request.grammar is None else request.grammar.matcher()
        sequence = _Sequence(
            request,
            self._checkpoint,
            sampler,
            slot,
            matcher=matcher,
            adapter_slot=request.adapter_slot,
        )
        if prepared.sampling.prompt_logprobs is not None:
            reused = 0  # every prompt position's logits are wanted: the whole prompt runs
        sequence.cached = reused  # the slot still holds this much of the prompt
        self.stats.reused_prompt_tokens += reused
        request.choices.append(sequence)
        self._running.append(sequence)
        sequence.image_parts = [None] * len(prepared.image_keys)
        return sequence

    def _queue_images(self, admitted: list[_Sequence], priority: Priority) -> None:
        """Cached images go to their sequences now; the others wait for a vision job (each
        image once, even if several requests or one request twice show it, or an earlier job
        is already encoding it), queued for the most urgent class that waits for them."""
        hits, misses = 0, 0
        for sequence in admitted:
            adapter = sequence.request.adapter
            vision_slot = -1 if adapter is None else adapter.vision_slot(sequence.adapter_slot)
            for key, (rows, thw) in zip(sequence.prepared.image_keys, sequence.prepared.visual):
                cached = self._images.get(key)
                if cached is not None:
                    sequence.take_image(key, cached)
                    sequence.request.stream.media_cache_hits += 1
                    hits += 1
                elif key in self._encoding:
                    sequence.awaiting.append(self._encoding[key])
                    # the tower runs once, for the request that queued it first: for this one it
                    # is as good as a cache hit (what routing repeated images together buys)
                    sequence.request.stream.media_cache_hits += 1
                else:
                    if key not in self._image_queue:
                        self._image_queue[key] = (rows, thw, vision_slot)
                        misses += 1
                    else:
                        sequence.request.stream.media_cache_hits += 1
                    queued_for = self._image_priority.get(key, priority)
                    self._image_priority[key] = min(queued_for, priority, key=_RANK.__getitem__)
                    sequence.queued_keys.add(key)
        if hits or misses:
            self._observe.images_encoded(hits, misses)

    def _next_vision_job(self, priority: Priority) -> _VisionWork | None:
        """A staged vision job over the queued images of `priority` and earlier classes, oldest
        first, while the patches of every job in progress stay within `max_vision_patches` (an
        item larger than that runs alone); the rest wait for a later job."""
        if not self._image_queue:
            return None
        room = self._settings.max_vision_patches - sum(work.patches for work in self._vision)
        keys, patches = [], 0
        for key, (_rows, thw, _slot) in self._image_queue.items():
            if _RANK[self._image_priority[key]] > _RANK[priority]:
                continue
            size = int(thw.prod())
            if patches + size > room and (keys or self._vision):
                break
            keys.append(key)
            patches += size
        if not keys:
            return None
        items = [self._image_queue.pop(key) for key in keys]
        for key in keys:
            del self._image_priority[key]
        device = self._vision_device
        slots = [slot for _, _, slot in items]
        job = VisionJob(
            self._model.model.visual,
            torch.cat([rows for rows, _, _ in items]).to(device),
            torch.stack([thw for _, thw, _ in items]).to(device),
            self.adapters.vision,
            slots,
        )
        pins = sorted({slot for slot in slots if slot >= 0})
        for slot in pins:  # its images' adapters stay in their slots until it is done
            self.adapters.pin(slot)
        tokens = patches // self._model.model.visual.spatial_merge_size**2
        work = _VisionWork(job, keys, tokens * self._image_token_cost, patches, pins)
        self._vision.append(work)
        self._encoding.update(dict.fromkeys(keys, work))
        taken = set(keys)
        for sequence in self._running:
            if sequence.queued_keys & taken:
                sequence.awaiting.append(work)
                sequence.queued_keys -= taken
        self.stats.vision_jobs += 1
        self.stats.largest_vision_patches = max(self.stats.largest_vision_patches, patches)
        return work

    def _run_vision(self, planned: list[tuple[_VisionWork, int]]) -> None:
        for work, stages in planned:
            started = time.monotonic()
            try:
                for _ in range(stages):
                    work.job.advance()
            except torch.OutOfMemoryError:
                self._vision_failed(work)
                continue
            ended = time.monotonic()
            self._vision_cost.vision_took(stages * work.stage_cost, ended - started)
            waiting = {id(s.request): s.request for s in self._running if work in s.awaiting}
            for request in waiting.values():
                request.timings.vision_ran(started, ended)
            if work.job.done:
                self._vision.remove(work)
                self._unpin(work.pins)
                for key in work.keys:
                    del self._encoding[key]
                for key, embeddings in zip(work.keys, work.job.embeddings):
                    self._images.put(key, embeddings)
                    for sequence in self._running:
                        if sequence.prefilling:
                            sequence.take_image(key, embeddings)

    def _vision_failed(self, work: _VisionWork) -> None:
        """Out of memory in the tower: the requests waiting for this job fail, no other."""
        self.stats.out_of_memory += 1
        self._vision.remove(work)
        self._unpin(work.pins)
        for key in work.keys:
            del self._encoding[key]
        release_cached_memory(self._vision_device)
        self._fail_for_memory([s for s in self._running if work in s.awaiting])

    def _unpin(self, slots: list[int]) -> None:
        for slot in slots:
            self.adapters.release(slot)

    def _fail_for_memory(self, sequences: list[_Sequence]) -> None:
        for sequence in sequences:
            log.warning(
                "request %s: out of device memory, failed alone", sequence.prepared.raw.request_id
            )
            sequence.request.fail(DeviceMemoryError(OUT_OF_MEMORY))
        self._retire([s for s in self._running if s.request.done])

    # ---- one step -----------------------------------------------------------------------

    def _execute(self, step: _Step) -> None:
        started = time.perf_counter()
        self._run_vision(step.vision)
        self.stats.vision_s += time.perf_counter() - started
        step.chunks = [chunk for chunk in step.chunks if not chunk[0].request.done]
        if not step.decode and not step.chunks:
            return
        stats = self.stats
        stats.largest_step_tokens = max(
            stats.largest_step_tokens,
            len(step.decode) + sum(length for _, _, length in step.chunks),
        )
        stats.partial_chunks += sum(
            start + length < s.prepared.prompt_tokens for s, start, length in step.chunks
        )
        started = time.monotonic()
        logits, finishing = self._forward_within_memory(step)
        ended = time.monotonic()
        stats.forward_s += ended - started
        if logits is None:  # nothing fitted: the step's requests failed
            return
        if step.prompt_rows:
            sampling_rows = len(step.decode) + len(finishing)
            self._prompt_logprobs(step.prompt_rows, logits[sampling_rows:])
            logits = logits[:sampling_rows]
        for sequence in step.decode:
            sequence.cached += 1
            sequence.next_position += 1
        for sequence, _start, length in step.chunks:
            sequence.cached += length
            sequence.request.timings.prefill_ran(started, ended, length)
        sampled, rows = list(step.decode), list(range(len(step.decode)))
        for row, leader in enumerate(finishing, start=len(step.decode)):
            leader.image_embeddings, leader.image_parts, leader.awaiting = None, [], []
            choices = self._forked(leader)
            sampled += choices
            rows += [row] * len(choices)  # every choice samples from the prompt's logits
        if len(rows) != len(logits):
            logits = logits[rows]
        if step.decode:  # before the responses go out, so a client that sees them sees this too
            self._observe.decoded(len(step.decode), self._waiting_count())
            self._observe.waiting_by_priority(self._waiting_by_priority())
        self._sample(sampled, logits, first_tokens=len(step.decode))

    def _forward_within_memory(self, step: _Step) -> tuple[torch.Tensor | None, list[_Sequence]]:
        """The step's forward; on an out-of-memory error a smaller one instead of a failed
        batch: prompt chunks halved (down to one token each), then none (their requests fail),
        then the decode rows in two halves, down to one row whose request fails. `step` keeps
        only the rows computed (a retry rewrites the same keys and values in place)."""
        try:
            return self._forward(step)
        except torch.OutOfMemoryError:
            self.stats.out_of_memory += 1
            release_cached_memory(self._checkpoint.device)
        if any(length > 1 for _, _, length in step.chunks):
            step.chunks = [(s, start, max(1, length // 2)) for s, start, length in step.chunks]
            return self._forward_within_memory(step)
        if step.chunks or len(step.decode) == 1:
            self._fail_for_memory([s for s, _, _ in step.chunks] or step.decode)
            step.chunks, step.decode = [], [s for s in step.decode if not s.request.done]
            return self._forward_within_memory(step) if step.decode else (None, [])
        half = len(step.decode) // 2
        halves = [_Step(step.decode[:half], [], []), _Step(step.decode[half:], [], [])]
        logits = [self._forward_within_memory(part)[0] for part in halves]
        step.decode = halves[0].decode + halves[1].decode
        computed = [part for part in logits if part is not None]
        return (torch.cat(computed) if computed else None), []

    def _forward(self, step: _Step) -> tuple[torch.Tensor, list[_Sequence]]:
        """One packed forward; logits of each decode token and of each finished prompt, then
        of the prompt positions whose logprobs are wanted (`step.prompt_rows`)."""
        step.prompt_rows = []
        extra: list[int] = []
        device = self._checkpoint.device
        ids = [s.last_token for s in step.decode]
        positions = [
            torch.tensor(
                [s.next_position + s.prepared.rope_delta for s in step.decode], dtype=torch.long
            ).expand(3, -1)
        ]
        chunks, offset, finishing, rows = [], len(step.decode), [], list(range(len(step.decode)))
        for sequence, start, length in step.chunks:
            prompt = sequence.prepared.inputs["input_ids"][0]
            ids += prompt[start : start + length].tolist()
            positions.append(sequence.prepared.positions[:, start : start + length])
            chunks.append(PrefillChunk(sequence.slot, start, length, offset))
            if sequence.prepared.sampling.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1; the last position's are the
                # first token's (a sampling row)
                count = min(start + length, sequence.prepared.prompt_tokens - 1) - start
                if count > 0:
                    step.prompt_rows.append((sequence, start, count))
                    extra += range(offset, offset + count)
            offset += length
            if start + length == sequence.prepared.prompt_tokens:
                finishing.append(sequence)
                rows.append(offset - 1)
        input_ids = torch.tensor(ids, device=device)
        embeds = self._model.model.language_model.embed_tokens(input_ids)
        for (sequence, start, length), chunk in zip(step.chunks, chunks):
            self._place_image_embeddings(embeds, sequence, start, length, chunk.offset)
        layout = StepLayout(
            [s.slot for s in step.decode],
            [s.cached + 1 for s in step.decode],
            chunks,
            device,
            self._length_multiple,
            self.slot_len,
        )
        started = time.perf_counter()
        lora = self._lora_slots(step)
        logits = self._text_forward(
            embeds,
            torch.cat(positions, dim=1),
            layout,
            self._cache,
            rows + extra,
            **({} if lora is None else {"lora_slots": lora}),
        )
        self._vision_cost.forward_took(len(ids), time.perf_counter() - started)
        return logits, finishing

    @staticmethod
    def _lora_slots(step: _Step) -> torch.Tensor | None:
        """Each token row's adapter slot (decode rows, then each chunk's tokens); None when no
        row has an adapter."""
        if all(s.lora_slot < 0 for s in step.decode) and all(
            s.lora_slot < 0 for s, _, _ in step.chunks
        ):
            return None
        slots = [s.lora_slot for s in step.decode]
        for sequence, _start, length in step.chunks:
            slots += [sequence.lora_slot] * length
        return torch.tensor(slots, dtype=torch.long)

    def _prompt_logprobs(
        self, prompt_rows: list[tuple[_Sequence, int, int]], logits: torch.Tensor
    ) -> None:
        """The logprob and rank of each prompt token at the positions computed, with the top
        alternatives the request asked for, batched over every row and brought to the host in
        one copy; each request's stream gathers them for its first response (vLLM's
        prompt_logprobs)."""
        targets_host = torch.cat(
            [s.prepared.inputs["input_ids"][0, p + 1 : p + 1 + n] for s, p, n in prompt_rows]
        )
        targets = targets_host.to(logits.device)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
        top = max(s.prepared.sampling.prompt_logprobs for s, _, _ in prompt_rows)
        parts = [chosen.double(), ranks.double()]
        if top:
            values, ids = torch.topk(logprobs, top, dim=-1)
            parts += [values.double().flatten(), ids.double().flatten()]
        host = torch.cat(parts).tolist()
        total = len(targets_host)
        values_at, ids_at = 2 * total, 2 * total + total * top
        row = 0
        for sequence, _start, count in prompt_rows:
            wanted = sequence.prepared.sampling.prompt_logprobs
            entries = sequence.request.stream.prompt_logprobs
            for target in targets_host[row : row + count].tolist():
                tops = [
                    (int(host[ids_at + row * top + k]), host[values_at + row * top + k])
                    for k in range(wanted)
                ]
                entries.append((target, host[row], int(host[total + row]), tops))
                row += 1

    def _place_image_embeddings(
        self, embeds, sequence: _Sequence, start: int, length: int, offset: int
    ) -> None:
        """The chunk's image and video tokens take their rows of the request's vision-tower
        output (its items joined in order of appearance)."""
        if sequence.image_embeddings is None:
            return
        ids = sequence.prepared.inputs["input_ids"][0]
        is_image = (ids == self._checkpoint.image_token_id) | (
            ids == self._checkpoint.video_token_id
        )
        before = int(is_image[:start].sum())
        inside = is_image[start : start + length]
        count = int(inside.sum())
        if count:
            where = inside.nonzero()[:, 0].to(embeds.device) + offset
            rows = sequence.image_embeddings[before : before + count]
            embeds[where] = rows.to(embeds.device, embeds.dtype)

    def _forked(self, leader: _Sequence) -> list[_Sequence]:
        """The leader and, for n > 1, one copy of its prompt cache per extra choice."""
        request = leader.request
        for index in range(1, request.prepared.sampling.n):
            if leader.adapter_slot is not None:
                self.adapters.pin(leader.adapter_slot)
            slot, _ = self._slots.take()
            self._cache.copy_slot(leader.slot, slot, leader.cached)
            twin = leader.fork(slot, index)
            request.choices.append(twin)
            self._running.append(twin)
        return list(request.choices)

    def _mask(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """The grammar masks of the constrained rows, in place, before any sampling. A matcher
        that fails fails its own request."""
        constrained = [
            (row, s)
            for row, s in enumerate(sequences)
            if s.matcher is not None and not s.request.done
        ]
        if not constrained:
            return
        try:
            failed = self._masks.apply(
                logits, [row for row, _ in constrained], [s.matcher for _, s in constrained]
            )
        except Exception:  # llguidance itself: the constrained requests fail, not the step
            log.exception("grammar mask failed")
            failed = range(len(constrained))
        for i in failed:
            sequence = constrained[i][1]
            error = sequence.matcher.get_error()[:300] or "no token is allowed"
            log.error(
                "request %s: grammar failed after %d tokens: %s",
                sequence.prepared.raw.request_id,
                sequence.generated,
                error,
            )
            sequence.request.fail(GrammarFailure(error))

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor, first_tokens: int) -> None:
        """Tokens for every row (one device→host copy), then each sequence takes its token;
        the text and the responses are the sender's (`responses`)."""
        started = time.perf_counter()
        self._mask(sequences, logits)
        tops = [
            s.prepared.sampling.top_logprobs if s.prepared.sampling.logprobs else None
            for s in sequences
        ]
        tokens, logprobs = sample(logits, [s.sampler for s in sequences], tops)
        sampled = time.perf_counter()
        self.stats.sampling_s += sampled - started
        done = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            request = sequence.request
            if request.done:
                done.append(sequence)
                continue
            try:
                sequence.accept(token)
            except Exception as exc:  # one request's failure (e.g. its grammar) is its own
                request.fail(exc)
                done.append(sequence)
                continue
            self._outbox.append(
                Token(
                    sequence.stream, token, sequence.finish_reason, logprobs[row], sequence.hidden
                )
            )
            if sequence.finish_reason == "repetition":
                self._observe.repetition_detected()
            if row >= first_tokens and sequence.index == 0:
                prepared = request.prepared
                self._observe.prefilled(
                    prepared.prompt_tokens,
                    prepared.image_tokens,
                    sequence.first_token_at - request.arrived,
                    prepared.video_tokens,
                )
            if sequence.finish_reason:
                done.append(sequence)
        self._retire(done + [s for s in self._running if s.request.done and s not in done])
        self.stats.output_s += time.perf_counter() - sampled

    def _retire(self, sequences: list[_Sequence]) -> None:
        if not sequences:
            return
        gone = {id(s) for s in sequences}
        self._running = [s for s in self._running if id(s) not in gone]
        for sequence in sequences:
            prompt = min(sequence.cached, sequence.prepared.prompt_tokens)
            self._slots.release(sequence.slot, _content(sequence.request, prompt))
            if sequence.adapter_slot is not None:
                self.adapters.release(sequence.adapter_slot)

    def _fail_running(self) -> None:
        for sequence in self._running:
            sequence.request.fail(RuntimeError("engine step failed"))
        self._retire(list(self._running))
        for work in self._vision:
            self._unpin(work.pins)
        self._vision, self._encoding = [], {}

    def _refuse_waiting(self) -> None:
        self._take_ready(block=False)
        for waiting in self._waiting.values():
            for request in waiting:
                request.fail(EngineStoppingError("the model is shutting down"))
            waiting.clear()
