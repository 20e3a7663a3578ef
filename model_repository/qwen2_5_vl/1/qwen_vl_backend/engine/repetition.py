"""The n-gram loop guard: stops a choice whose last tokens repeat one n-gram too many times.

Vision-language models reading documents fall into loops (the same line, cell or phrase over
and over until max_tokens); `repetition_penalty` fights them by distorting every token's
score, which hurts exactly the text OCR must copy faithfully. The guard changes no score: it
watches the tokens and ends the choice (finish_reason "stop", `repetition_detected`) once the
last `ngram` tokens have come `max_repeats` + 1 times in a row.

Cost per token is O(1) and exact: the tail is made of one n-gram repeated k + 1 times exactly
when each of its last n·k tokens equals the token n before it, so the guard keeps the last n
tokens (a ring) and the length of the current run of such equalities. A rolling hash of the
last n tokens would also be O(1) per token, but it needs the same ring (to take the outgoing
token out) and can collide; comparing token ids cannot. A loop whose period divides n is an
n-gram loop too, so ngram 8 also catches loops of 1, 2 and 4 tokens.
"""

from __future__ import annotations


class RepetitionGuard:
    """One choice's guard: `push` each sampled token, True once the loop is long enough."""

    def __init__(self, ngram: int, max_repeats: int):
        self._ring: list[int | None] = [None] * ngram  # the last `ngram` tokens
        self._at = 0  # where the next token goes (and the token `ngram` back is)
        self._run = 0  # consecutive tokens equal to the one `ngram` before them
        self._needed = ngram * max_repeats

    def push(self, token: int) -> bool:
        self._run = self._run + 1 if self._ring[self._at] == token else 0
        self._ring[self._at] = token
        self._at = (self._at + 1) % len(self._ring)
        return self._run >= self._needed
