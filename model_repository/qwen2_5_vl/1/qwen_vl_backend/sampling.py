"""Choosing the next token for one sequence: penalties, temperature, top-k/top-p, seed, logprobs.

Each sequence owns its sampler (and its own seeded `torch.Generator`), so its output does not
depend on which other sequences share the decode batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from .params import SamplingParams


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
        return (self.greedy and self.repetition_penalty == 1.0 and not self.logprobs
                and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0)


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
    def __init__(self, settings: ResolvedSampling, prompt_ids: torch.Tensor, vocab_size: int):
        self.settings = settings
        device = prompt_ids.device
        self._generator = torch.Generator(device=device)
        seed = settings.seed if settings.seed is not None else random.getrandbits(63)
        self._generator.manual_seed(seed % (2**63))
        self._seen = torch.unique(prompt_ids.reshape(-1)) if settings.repetition_penalty != 1.0 else None
        needs_counts = settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0
        self._counts = torch.zeros(vocab_size, device=device) if needs_counts else None

    def observe(self, token: int) -> None:
        if self._seen is not None:
            self._seen = torch.unique(torch.cat([self._seen, self._seen.new_tensor([token])]))
        if self._counts is not None:
            self._counts[token] += 1

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of raw logits (float32)."""
        s = self.settings
        scores = logits
        if self._seen is not None:
            picked = scores[self._seen]
            picked = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
            scores = scores.clone()
            scores[self._seen] = picked
        if self._counts is not None:
            scores = scores - s.frequency_penalty * self._counts - s.presence_penalty * (self._counts > 0)
        if s.greedy:
            return int(scores.argmax())
        scores = scores / s.temperature
        if 0 < s.top_k < scores.shape[-1]:
            kth = torch.topk(scores, s.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            scores = _top_p_filter(scores, s.top_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(scores, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    drop_sorted = probs.cumsum(-1) - probs > top_p  # keeps the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, samplers: list[TokenSampler]) -> list[int]:
    """One token per row; plain greedy rows share one argmax."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if not sampler.settings.plain_greedy:
            tokens[row] = sampler.choose(logits[row])
        sampler.observe(tokens[row])
    return tokens


# ---- logprobs, OpenAI shape ---------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable-character alphabet → the byte each stands for."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
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


def logprob_entry(logits: torch.Tensor, token: int, top: int,
                  texts: Callable[[int], tuple[str, list[int]]]) -> dict:
    """OpenAI's `{"token", "logprob", "bytes", "top_logprobs"}` from the raw model logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)

    def entry(token_id: int, value: float) -> dict:
        text, raw = texts(token_id)
        return {"token": text, "logprob": max(value, -9999.0), "bytes": raw}

    result = entry(token, float(logprobs[token]))
    result["top_logprobs"] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        result["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values, ids)]
    return result
