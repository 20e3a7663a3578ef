"""Grammar-constrained decoding with llguidance (docs/engine.md, "Constrained decoding").

- `grammar_source`: the `structured` sampling parameter → llguidance grammar text (JSON
  Schema, or a Lark grammar for tool calls with one `%json` alternative per tool);
- `GrammarCompiler`: compiles on the preparation pool, into a bounded LRU cache keyed by the
  grammar text; a request waits only for its own grammar (an identical one being compiled by
  another worker is waited for, not compiled twice);
- `TokenMasks`: on the engine thread, one bitmask fill for the constrained rows of a step
  (llguidance's parallel batch fill) applied to their logits before any sampling arithmetic.

Every sequence owns a matcher (a copy of its grammar's start state); `_Sequence.accept`
advances it with each token.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..contract import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ModelLimits
from ..errors import RequestError
from ..request.params import STRUCTURED, StructuredOutput, check_structured_limits

log = logging.getLogger(__name__)

# One space after ',' and ':' (json.dumps's default, and how Qwen's chat template renders tool
# calls) and no whitespace anywhere else: nothing unbounded for a model to wander into.
# Applied as overrides, so a schema's own "x-guidance" cannot loosen it.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 300


class GrammarFailure(RuntimeError):
    """A sequence's matcher failed mid-generation: its request fails (an internal error), the
    engine and the other requests go on."""


def _json_options(strict: bool) -> dict:
    # strict: keywords llguidance cannot enforce are an error; otherwise they are ignored
    return {**JSON_FORMAT, "lenient": not strict}


def _literal(text: str) -> str:
    """A Lark string literal matching exactly `text` (JSON escapes)."""
    return json.dumps(text)


def _tool_arguments_schema(parameters: str, strict: bool) -> str:
    schema = json.loads(parameters)
    if "type" not in schema:
        schema["type"] = "object"  # arguments are an object, as Qwen's tool-call parser expects
    schema["x-guidance"] = _json_options(strict)
    return json.dumps(schema)


def _tool_calls_lark(structured: StructuredOutput, marker: Callable[[str], str]) -> str:
    """`<tool_call>\\n{"name": "<name>", "arguments": <object>}\\n</tool_call>`, one of the
    tools by name with that tool's arguments; with `parallel`, one or more blocks separated by
    a newline."""
    lines = [
        'start: call ("\\n" call)*' if structured.parallel else "start: call",
        f'call: {marker(TOOL_CALL_OPEN)} "\\n" body "\\n" {marker(TOOL_CALL_CLOSE)}',
        "body: " + " | ".join(f"tool_{i}" for i in range(len(structured.tools))),
    ]
    for i, (name, parameters) in enumerate(structured.tools):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        lines.append(f'tool_{i}: {_literal(head)} arguments_{i} "}}"')
        lines.append(
            f"arguments_{i}: %json {_tool_arguments_schema(parameters, structured.strict)}"
        )
    return "\n".join(lines) + "\n"


def grammar_source(structured: StructuredOutput, marker: Callable[[str], str] = _literal) -> str:
    """The llguidance grammar text for `structured`. `marker(text)` writes `<tool_call>` and
    `</tool_call>` into the Lark grammar: a token reference where the tokenizer has one token
    for them (Qwen's), else the literal text."""
    import llguidance

    if structured.type == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=_json_options(False)
        )
    if structured.type == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(
            structured.schema, overrides=_json_options(structured.strict)
        )
    return llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(structured, marker))


@dataclass
class CompiledGrammar:
    """A grammar's matcher in its start state (never advanced itself): each sequence gets a
    copy."""

    source: str
    template: Any  # llguidance.LLMatcher
    compile_seconds: float

    @property
    def cost(self) -> int:
        """Bytes it is assumed to hold, for the cache bound. llguidance does not report its
        memory; measured RSS was 18-36 KiB per compiled matcher for 0.3-7 KB grammars (151k
        vocabulary), and lexer states are added lazily as sequences advance, so this leaves
        room for them."""
        return 64 * 1024 + 64 * len(self.source)

    def matcher(self):
        return self.template.deep_copy()


class _Pending:
    def __init__(self):
        self.done = threading.Event()
        self.result: CompiledGrammar | None = None
        self.error: BaseException | None = None


class GrammarCompiler:
    """Compiles `structured` parameters on the calling (preparation) thread, cached by grammar
    text in an LRU bounded by `grammar_cache_mb` (an estimate of bytes, `CompiledGrammar.cost`)."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids,
        limits: ModelLimits,
        cache_bytes: int,
        on_compiled: Callable[[float], None] = lambda seconds: None,
    ):
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._limits = limits  # max_tools, max_schema_bytes, max_schema_depth
        self._cache_bytes = cache_bytes
        self._on_compiled = on_compiled
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cached_bytes = 0
        self._compiling: dict[str, _Pending] = {}
        self._markers: dict[str, str] = {}
        self.compiles = 0  # grammars compiled (cache misses), for tests
        self.hits = 0

    # ---- the tokenizer, built once on first use (~1 s for Qwen's 151k vocabulary) ----------

    def tokenizer(self):
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                started = time.perf_counter()
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos
                )
                log.info(
                    "grammar tokenizer ready (%d tokens) in %.2fs",
                    self._vocab_size,
                    time.perf_counter() - started,
                )
            return self._ll_tokenizer

    def _marker(self, text: str) -> str:
        if text not in self._markers:
            ids = self._hf_tokenizer.encode(text, add_special_tokens=False)
            self._markers[text] = f"<[{ids[0]}]>" if len(ids) == 1 else _literal(text)
        return self._markers[text]

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    # ---- compiling ---------------------------------------------------------------------

    def compile(self, structured: StructuredOutput) -> CompiledGrammar:
        check_structured_limits(structured, self._limits)
        try:
            source = grammar_source(structured, self._marker)
        except ValueError as exc:
            raise RequestError(_message(str(exc)), _param(structured)) from None
        with self._lock:
            cached = self._cache.get(source)
            if cached is not None:
                self._cache.move_to_end(source)
                self.hits += 1
                return cached
            pending = self._compiling.get(source)
            owner = pending is None
            if owner:
                pending = self._compiling[source] = _Pending()
        if not owner:  # the same grammar is being compiled for another request: wait for it
            pending.done.wait()
            if isinstance(pending.error, RequestError):
                error = pending.error
                raise RequestError(error.message, error.param, error.code)
            if pending.error is not None:
                raise RuntimeError("grammar compilation failed") from pending.error
            return pending.result
        try:
            pending.result = self._compile(structured, source)
            self._store(pending.result)
            return pending.result
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._compiling[source]
            pending.done.set()

    def _compile(self, structured: StructuredOutput, source: str) -> CompiledGrammar:
        import llguidance
        import llguidance.torch as lltorch

        tokenizer = self.tokenizer()
        started = time.perf_counter()
        limits = llguidance.LLParserLimits(verbose_errors=False)
        matcher = llguidance.LLMatcher(tokenizer, source, log_level=0, limits=limits)
        if matcher.is_error():
            raise RequestError(
                _message(matcher.get_error()), self._failing_param(structured, tokenizer)
            )
        # The first mask, here rather than on the engine thread: it builds the start state's
        # lexer, and a grammar that allows nothing at all is the client's error.
        mask = lltorch.allocate_token_bitmask(1, self._vocab_size)
        lltorch.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error() or not bool(mask.any()):
            raise RequestError(
                _message(matcher.get_error() or "the grammar allows no output"),
                _param(structured),
            )
        seconds = time.perf_counter() - started
        self.compiles += 1
        self._on_compiled(seconds)
        return CompiledGrammar(source, matcher, seconds)

    def _failing_param(self, structured: StructuredOutput, tokenizer) -> str:
        """For tool calls, the first tool whose schema does not compile alone."""
        if structured.type != "tool_calls":
            return _param(structured)
        import llguidance

        for param, parameters in structured.schemas():
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                _tool_arguments_schema(parameters, structured.strict)
            )
            if llguidance.LLMatcher.validate_grammar(grammar, tokenizer):
                return param
        return _param(structured)

    def _store(self, compiled: CompiledGrammar) -> None:
        cost = compiled.cost
        if cost > self._cache_bytes:
            return
        with self._lock:
            if compiled.source in self._cache:
                return
            self._cache[compiled.source] = compiled
            self._cached_bytes += cost
            while self._cached_bytes > self._cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.cost


def _param(structured: StructuredOutput) -> str:
    if structured.type == "json_schema":
        return f"{STRUCTURED}.schema"
    if structured.type == "tool_calls":
        return f"{STRUCTURED}.tools"
    return STRUCTURED


def _message(error: str) -> str:
    error = " ".join(error.split())
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 1] + "…"
    return f"the schema cannot be enforced: {error}"


class TokenMasks:
    """The step's grammar masks: one bitmask fill for every constrained row (llguidance's
    parallel batch fill, GIL released), unpacked with a byte → 8 × (0 or -inf) table and added
    to those rows' logits in place, so a masked token is -inf before penalties, temperature,
    top-k/top-p, the greedy argmax and logprobs. Adding 0.0 leaves an allowed logit exactly as
    it was: a constrained row and the free rows beside it compute what they would alone."""

    def __init__(self, vocab_size: int):
        if sys.byteorder != "little":  # the byte view below reads bit 8*b+i of word w as
            raise RuntimeError("grammar masks assume a little-endian host")  # byte 4w+b, bit i
        self._vocab = vocab_size
        self._words = (vocab_size + 31) // 32
        self._bitmask: torch.Tensor | None = None
        self._executor = None
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
            self._tables[device] = torch.where(bits == 1, 0.0, float("-inf")).to(device)
        return self._tables[device]

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list) -> list[int]:
        """Masks `logits[rows[i]]` by `matchers[i]` in place; returns the indexes `i` whose
        matcher failed (an error state, or no token allowed)."""
        import llguidance
        import llguidance.torch as lltorch

        count = len(rows)
        if self._bitmask is None or self._bitmask.shape[0] < count:
            self._bitmask = torch.full((max(count, 8), self._words), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        lltorch.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], self._bitmask
        )
        words = self._bitmask[:count]
        empty = (words == 0).all(dim=1).tolist()
        failed = [i for i, m in enumerate(matchers) if empty[i] or m.is_error()]
        device = logits.device
        penalty = self._table(device)[words.view(torch.uint8).to(device).long()]
        width = min(logits.shape[-1], self._vocab)
        index = torch.tensor(rows, device=device)
        masked = logits.index_select(0, index)
        masked[:, :width] += penalty.reshape(count, -1)[:, :width]
        masked[:, width:] = float("-inf")  # logits beyond the grammar's vocabulary
        logits.index_copy_(0, index, masked)
        return failed
