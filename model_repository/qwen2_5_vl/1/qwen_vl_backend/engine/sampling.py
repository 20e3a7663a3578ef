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


def _column(samplers: list[TokenSampler], name: str, device) -> torch.Tensor:
    return torch.tensor([getattr(s.settings, name) for s in samplers], device=device)[:, None]


def _penalised(scores: torch.Tensor, samplers: list[TokenSampler]) -> torch.Tensor:
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
        penalty = _column(samplers, "repetition_penalty", device)
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
            - _column(samplers, "frequency_penalty", device) * counts
            - _column(samplers, "presence_penalty", device) * (counts > 0)
        )
    return scores


def _filtered(scores: torch.Tensor, samplers: list[TokenSampler]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (keeping the token that crosses top_p), per row."""
    device, vocab = scores.device, scores.shape[-1]
    scores = scores / _column(samplers, "temperature", device)
    top_k = _column(samplers, "top_k", device)
    top_p = _column(samplers, "top_p", device)
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


def choose_tokens(logits: torch.Tensor, samplers: list[TokenSampler]) -> list[int]:
    """One token per row of float32 logits: plain greedy rows share one argmax, the others go
    through the batched penalties, filters and draws."""
    tokens = logits.argmax(dim=-1)
    special = [row for row, s in enumerate(samplers) if not s.settings.plain_greedy]
    if special:
        rows = torch.tensor(special, device=logits.device)
        group = [samplers[row] for row in special]
        scores = _penalised(logits.index_select(0, rows), group)
        chosen = scores.argmax(dim=-1)
        drawn = [i for i, s in enumerate(group) if not s.settings.greedy]
        if drawn:
            index = torch.tensor(drawn, device=logits.device)
            subset = [group[i] for i in drawn]
            chosen[index] = _sampled(_filtered(scores.index_select(0, index), subset), subset)
        tokens[rows] = chosen
    result = tokens.tolist()
    for sampler, token in zip(samplers, result):
        sampler.observe(token)
    return result


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
    logits: torch.Tensor, token: int, top: int, texts: Callable[[int], tuple[str, list[int]]]
) -> dict:
    """OpenAI's `{"token", "logprob", "bytes", "top_logprobs"}` from the model logits (after the
    grammar mask, if any: a masked token is -inf and never listed among the top ones)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)

    def entry(token_id: int, value: float) -> dict:
        text, raw = texts(token_id)
        return {"token": text, "logprob": max(value, -9999.0), "bytes": raw}

    result = entry(token, float(logprobs[token]))
    result["top_logprobs"] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        result["top_logprobs"] = [
            entry(int(i), float(v)) for v, i in zip(values, ids) if v != float("-inf")
        ]
    return result
