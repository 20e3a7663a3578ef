"""Choosing the next token for one sequence: penalties, temperature, top-k/top-p, seed, logprobs.

Each sequence owns its sampler (and its own seeded `torch.Generator`), so its output does not
depend on which other sequences share the decode batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..request.params import SamplingParams
from .staging import to_device

# A sampled token's logprob and the top alternatives as (token id, logprob), best first.
TokenLogprobs = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class ResolvedSampling:
    """A request's sampling settings with the checkpoint's generation_config defaults filled in."""

    greedy: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: rows like this are decided for the whole batch at once."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and not self.logprobs
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )


def resolve_sampling(params: SamplingParams, generation_config: Any) -> ResolvedSampling:
    default = lambda name, fallback: getattr(generation_config, name, None) or fallback  # noqa: E731
    if params.temperature is not None:
        greedy = params.temperature == 0.0
    else:
        explicit_sampling = params.top_p is not None or params.top_k is not None
        greedy = not (getattr(generation_config, "do_sample", False) or explicit_sampling)
    top_k = params.top_k if params.top_k is not None else default("top_k", 0)
    return ResolvedSampling(
        greedy=greedy,
        temperature=params.temperature or default("temperature", 1.0),
        top_p=params.top_p if params.top_p is not None else default("top_p", 1.0),
        top_k=max(0, top_k),
        repetition_penalty=params.repetition_penalty or default("repetition_penalty", 1.0),
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        seed=params.seed,
    )


class TokenSampler:
    """One sequence's sampling state: settings, seeded generator, tokens seen (for penalties).

    The arithmetic runs batched across rows in `choose_tokens`; what is per sequence is only the
    state, so a sequence's tokens do not depend on which others share the step.
    """

    def __init__(self, settings: ResolvedSampling, prompt_ids: torch.Tensor, vocab_size: int):
        self.settings = settings
        device = prompt_ids.device
        self.generator = _seeded_generator(device, settings.seed)
        self.seen = None
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt_ids.reshape(-1)] = True
        needs_counts = settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0
        self.counts = torch.zeros(vocab_size, device=device) if needs_counts else None

    def fork(self, seed: int | None) -> TokenSampler:
        """A sampler with the same settings and history and its own generator (another choice)."""
        twin = TokenSampler.__new__(TokenSampler)
        twin.settings = self.settings
        twin.generator = _seeded_generator(self.generator.device, seed)
        twin.seen = None if self.seen is None else self.seen.clone()
        twin.counts = None if self.counts is None else self.counts.clone()
        return twin

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def _seeded_generator(device, seed: int | None) -> torch.Generator:
    """A generator of its own, seeded by the request (or at random when it names no seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed if seed is not None else random.getrandbits(63)) % (2**63))
    return generator


# Columns of the per-row settings matrix (`_settings`).
_TEMPERATURE, _TOP_K, _TOP_P, _REPETITION, _FREQUENCY, _PRESENCE = range(6)


def _settings(samplers: list[TokenSampler]) -> torch.Tensor:
    """Every row's numeric settings as one float32 matrix on the host (top_k is exact in
    float32), so one copy moves them all."""
    rows = [
        (
            s.settings.temperature,
            s.settings.top_k,
            s.settings.top_p,
            s.settings.repetition_penalty,
            s.settings.frequency_penalty,
            s.settings.presence_penalty,
        )
        for s in samplers
    ]
    return torch.tensor(rows, dtype=torch.float32)


def _column(settings: torch.Tensor, column: int) -> torch.Tensor:
    return settings[:, column : column + 1]


def _penalised(
    scores: torch.Tensor, samplers: list[TokenSampler], settings: torch.Tensor
) -> torch.Tensor:
    """Repetition (HF's rule) and presence/frequency (OpenAI's) penalties, all rows at once."""
    device, vocab = scores.device, scores.shape[-1]
    if any(s.seen is not None for s in samplers):
        seen = torch.stack(
            [
                s.seen
                if s.seen is not None
                else torch.zeros(vocab, dtype=torch.bool, device=device)
                for s in samplers
            ]
        )
        penalty = _column(settings, _REPETITION)
        scores = torch.where(
            seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores
        )
    if any(s.counts is not None for s in samplers):
        counts = torch.stack(
            [
                s.counts if s.counts is not None else torch.zeros(vocab, device=device)
                for s in samplers
            ]
        )
        scores = (
            scores
            - _column(settings, _FREQUENCY) * counts
            - _column(settings, _PRESENCE) * (counts > 0)
        )
    return scores


def _filtered(scores: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (keeping the token that crosses top_p), per row."""
    vocab = scores.shape[-1]
    scores = scores / _column(settings, _TEMPERATURE)
    top_k = _column(settings, _TOP_K).long()
    top_p = _column(settings, _TOP_P)
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    keep_k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = ordered.gather(1, keep_k - 1)
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop_sorted = (probs.cumsum(-1) - probs > top_p) | (ordered == float("-inf"))
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def _sampled(scores: torch.Tensor, samplers: list[TokenSampler]) -> torch.Tensor:
    """One draw per row: argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race);
    each row's noise comes from its own generator, so seeds reproduce whatever the batch."""
    probs = torch.softmax(scores, dim=-1)
    noise = torch.stack(
        [
            torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=s.generator)
            for s in samplers
        ]
    )
    return (probs / noise).argmax(dim=-1)


class _StepRows:
    """Which rows of a step need what, with the index and settings tensors built on the host
    and moved to the device in one copy (`staging`)."""

    def __init__(self, samplers: list[TokenSampler], top_logprobs: list[int | None], device):
        self.special = [row for row, s in enumerate(samplers) if not s.settings.plain_greedy]
        group = [samplers[row] for row in self.special]
        self.drawn = [i for i, s in enumerate(group) if not s.settings.greedy]
        self.wanted = [row for row, top in enumerate(top_logprobs) if top is not None]
        self.special_rows = self.settings = self.drawn_rows = self.wanted_rows = None
        if self.special or self.wanted:  # plain greedy steps need none of it
            host = [torch.tensor(self.special, dtype=torch.long), _settings(group)]
            host += [torch.tensor(self.drawn, dtype=torch.long)]
            host += [torch.tensor(self.wanted, dtype=torch.long)]
            moved = to_device(host, device)
            self.special_rows, self.settings, self.drawn_rows, self.wanted_rows = moved


def choose_tokens(
    logits: torch.Tensor, samplers: list[TokenSampler], rows: _StepRows | None = None
) -> torch.Tensor:
    """One token per row of float32 logits, on the logits' device (no copy to the host):
    plain greedy rows share one argmax, the others go through the batched penalties, filters
    and draws."""
    rows = rows or _StepRows(samplers, [None] * len(samplers), logits.device)
    tokens = logits.argmax(dim=-1)
    if rows.special:
        group = [samplers[row] for row in rows.special]
        scores = _penalised(logits.index_select(0, rows.special_rows), group, rows.settings)
        chosen = scores.argmax(dim=-1)
        if rows.drawn:
            index = rows.drawn_rows
            subset = [group[i] for i in rows.drawn]
            settings = rows.settings.index_select(0, index)
            chosen[index] = _sampled(_filtered(scores.index_select(0, index), settings), subset)
        tokens[rows.special_rows] = chosen
    return tokens


def sample(
    logits: torch.Tensor, samplers: list[TokenSampler], top_logprobs: list[int | None]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """A step's tokens and, for the rows that ask (`top_logprobs[row]` not None: how many
    alternatives), their logprobs, computed batched on the device and brought to the host in
    one copy. Logprobs are of the logits as given (after the grammar mask, if any: a masked
    token is -inf and never listed)."""
    rows = _StepRows(samplers, top_logprobs, logits.device)
    tokens = choose_tokens(logits, samplers, rows)
    wanted = rows.wanted
    parts = [tokens.double()]
    top = max((top_logprobs[row] for row in wanted), default=0)
    if wanted:
        index = rows.wanted_rows
        logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)
        parts.append(logprobs.gather(1, tokens.index_select(0, index)[:, None]).double()[:, 0])
        if top:
            values, ids = torch.topk(logprobs, top, dim=-1)
            parts += [values.double().flatten(), ids.double().flatten()]
    host = torch.cat(parts).tolist()  # the step's one device→host copy
    count = len(samplers)
    result = [int(t) for t in host[:count]]
    for sampler, token in zip(samplers, result):
        sampler.observe(token)
    per_row: list[TokenLogprobs | None] = [None] * count
    # host = tokens [count] | chosen logprobs [wanted] | top values [wanted, top] | top ids
    values_at = count + len(wanted)
    ids_at = values_at + len(wanted) * top
    for i, row in enumerate(wanted):
        values = host[values_at + i * top : values_at + i * top + top_logprobs[row]]
        ids = host[ids_at + i * top : ids_at + i * top + top_logprobs[row]]
        per_row[row] = (host[count + i], [(int(t), v) for t, v in zip(ids, values)])
    return result, per_row


# ---- logprobs, OpenAI shape ---------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable-character alphabet → the byte each stands for."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenTexts:
    """Token id → (text, bytes) as OpenAI logprobs report them, cached per id."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            piece = self._tokenizer.convert_ids_to_tokens(token_id) or ""
            decoder = _byte_decoder()
            if token_id in self._special or not all(ch in decoder for ch in piece):
                raw = piece.encode("utf-8")
            else:
                raw = bytes(decoder[ch] for ch in piece)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]


def logprob_entry(
    token: int, logprobs: TokenLogprobs, texts: Callable[[int], tuple[str, list[int]]]
) -> dict:
    """OpenAI's `{"token", "logprob", "bytes", "top_logprobs"}` from what `sample` computed."""
    chosen, top = logprobs

    def entry(token_id: int, value: float) -> dict:
        text, raw = texts(token_id)
        return {"token": text, "logprob": max(value, -9999.0), "bytes": raw}

    result = entry(token, chosen)
    result["top_logprobs"] = [entry(i, v) for i, v in top if v != float("-inf")]
    return result
