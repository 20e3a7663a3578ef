"""Choosing the next token for one sequence: logit bias, min_tokens, penalties, temperature,
min-p, top-k/top-p, seed, logprobs.

Each sequence owns its sampler (and its own seeded `torch.Generator`), so its output does not
depend on which other sequences share the decode batch.

The order is vLLM's: the grammar mask (batching), the logit bias and the min_tokens ban (the
tokens that would stop the choice set to -inf while it has fewer than min_tokens), the
penalties, then greedy's argmax, or temperature, min-p, top-k, top-p and the draw. Logprobs are
of the logits before the bias, ban and penalties (vLLM's default, "raw" logprobs).
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
    min_p: float = 0.0
    # (token id, bias) added to the logits (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # No token of `stop_tokens` (those that would end the choice: EOS unless ignore_eos, and
    # stop_token_ids) is sampled while fewer than `min_tokens` have been.
    min_tokens: int = 0
    stop_tokens: tuple[int, ...] = ()

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: rows like this are decided for the whole batch at once
        (a sampler below its min_tokens is not, `TokenSampler.plain_greedy`)."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and not self.logprobs
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and not self.logit_bias
        )


def resolve_sampling(
    params: SamplingParams, generation_config: Any, eos_ids: frozenset[int] = frozenset()
) -> ResolvedSampling:
    """`eos_ids`: the checkpoint's end-of-sequence tokens, which stop a choice unless
    ignore_eos (they and stop_token_ids are what min_tokens holds back)."""
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
        min_p=params.min_p,
        logit_bias=params.logit_bias,
        min_tokens=params.min_tokens,
        stop_tokens=stop_tokens(params, eos_ids) if params.min_tokens else (),
    )


def stop_tokens(params: SamplingParams, eos_ids: frozenset[int]) -> tuple[int, ...]:
    """The tokens that end a choice: stop_token_ids, and EOS unless ignore_eos."""
    eos = () if params.ignore_eos else tuple(sorted(eos_ids))
    return tuple(dict.fromkeys((*eos, *params.stop_token_ids)))


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
        self.generated = 0  # tokens sampled so far (min_tokens)
        # Host tensors, joined with the other rows' into one copy per step (`_StepRows`).
        self.bias_ids = self.bias_values = self.banned = None
        if settings.logit_bias:
            self.bias_ids = torch.tensor([t for t, _ in settings.logit_bias], dtype=torch.long)
            self.bias_values = torch.tensor(
                [b for _, b in settings.logit_bias], dtype=torch.float32
            )
        if settings.min_tokens and settings.stop_tokens:
            self.banned = torch.tensor(settings.stop_tokens, dtype=torch.long)

    @property
    def banning(self) -> bool:
        """Whether this step bans the stop tokens (fewer than min_tokens sampled so far)."""
        return self.banned is not None and self.generated < self.settings.min_tokens

    @property
    def plain_greedy(self) -> bool:
        return self.settings.plain_greedy and not self.banning

    def fork(self, seed: int | None) -> TokenSampler:
        """A sampler with the same settings and history and its own generator (another choice)."""
        twin = TokenSampler.__new__(TokenSampler)
        twin.settings = self.settings
        twin.generator = _seeded_generator(self.generator.device, seed)
        twin.seen = None if self.seen is None else self.seen.clone()
        twin.counts = None if self.counts is None else self.counts.clone()
        twin.generated = self.generated
        twin.bias_ids, twin.bias_values, twin.banned = self.bias_ids, self.bias_values, self.banned
        return twin

    def observe(self, token: int) -> None:
        self.generated += 1
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
_TEMPERATURE, _TOP_K, _TOP_P, _REPETITION, _FREQUENCY, _PRESENCE, _MIN_P = range(7)


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
            s.settings.min_p,
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


def _biased(scores: torch.Tensor, rows: _StepRows) -> torch.Tensor:
    """The logit bias and the min_tokens ban of the rows that have them, in place: each a
    scatter over (row, token) pairs of every such row at once."""
    if rows.bias_rows is not None:
        scores.index_put_((rows.bias_rows, rows.bias_ids), rows.bias_values, accumulate=True)
    if rows.ban_rows is not None:
        scores[rows.ban_rows, rows.ban_ids] = float("-inf")
    return scores


def _filtered(scores: torch.Tensor, settings: torch.Tensor, min_p: bool = False) -> torch.Tensor:
    """Temperature, then min-p (with `min_p`: some row has one), top-k, then top-p (keeping the
    token that crosses top_p), per row."""
    vocab = scores.shape[-1]
    scores = scores / _column(settings, _TEMPERATURE)
    if min_p:  # tokens less likely than min_p times the likeliest one; 0 keeps every token
        probs = torch.softmax(scores, dim=-1)
        floor = _column(settings, _MIN_P) * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < floor, float("-inf"))
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
    and moved to the device in one copy (`staging`): the special rows, their settings, the
    drawn ones, those that want logprobs, and the (row, token, value) triples of the logit
    biases and min_tokens bans, every row's joined into one list each."""

    def __init__(self, samplers: list[TokenSampler], top_logprobs: list[int | None], device):
        self.special = [row for row, s in enumerate(samplers) if not s.plain_greedy]
        group = [samplers[row] for row in self.special]
        self.drawn = [i for i, s in enumerate(group) if not s.settings.greedy]
        self.min_p = any(group[i].settings.min_p > 0 for i in self.drawn)
        self.wanted = [row for row, top in enumerate(top_logprobs) if top is not None]
        self.special_rows = self.settings = self.drawn_rows = self.wanted_rows = None
        self.bias_rows = self.bias_ids = self.bias_values = None
        self.ban_rows = self.ban_ids = None
        if self.special or self.wanted:  # plain greedy steps need none of it
            host = [torch.tensor(self.special, dtype=torch.long), _settings(group)]
            host += [torch.tensor(self.drawn, dtype=torch.long)]
            host += [torch.tensor(self.wanted, dtype=torch.long)]
            biased = [(i, s) for i, s in enumerate(group) if s.bias_ids is not None]
            banning = [(i, s) for i, s in enumerate(group) if s.banning]
            if biased:
                host += _pairs(biased, [s.bias_ids for _, s in biased])
                host.append(torch.cat([s.bias_values for _, s in biased]))
            if banning:
                host += _pairs(banning, [s.banned for _, s in banning])
            moved = to_device(host, device)
            self.special_rows, self.settings, self.drawn_rows, self.wanted_rows = moved[:4]
            rest = moved[4:]
            if biased:
                self.bias_rows, self.bias_ids, self.bias_values, rest = *rest[:3], rest[3:]
            if banning:
                self.ban_rows, self.ban_ids = rest


def _pairs(rows: list[tuple[int, TokenSampler]], ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """(row index repeated per token, token ids) of each row's tokens, all rows joined."""
    counts = torch.tensor([len(t) for t in ids], dtype=torch.long)
    index = torch.tensor([row for row, _ in rows], dtype=torch.long)
    return [index.repeat_interleave(counts), torch.cat(ids)]


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
        scores = _biased(logits.index_select(0, rows.special_rows), rows)
        scores = _penalised(scores, group, rows.settings)
        chosen = scores.argmax(dim=-1)
        if rows.drawn:
            index = rows.drawn_rows
            subset = [group[i] for i in rows.drawn]
            settings = rows.settings.index_select(0, index)
            filtered = _filtered(scores.index_select(0, index), settings, rows.min_p)
            chosen[index] = _sampled(filtered, subset)
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


def prompt_logprob_entries(
    entries: list[tuple[int, float, int, list[tuple[int, float]]]],
    texts: Callable[[int], tuple[str, list[int]]],
) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing scores it), then per
    token {token id: {"logprob", "rank", "decoded_token"}} for the token itself and the top
    alternatives asked for (ranks 1, 2, ...; the token's own rank among the vocabulary)."""
    result: list[dict | None] = [None]
    for token, logprob, rank, top in entries:
        position = {str(token): _prompt_entry(logprob, rank, token, texts)}
        for k, (alternative, value) in enumerate(top, start=1):
            position.setdefault(str(alternative), _prompt_entry(value, k, alternative, texts))
        result.append(position)
    return result


def _prompt_entry(logprob: float, rank: int, token: int, texts) -> dict:
    return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": texts(token)[0]}
