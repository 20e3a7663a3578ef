"""Token ids → text deltas that are always valid UTF-8, with stop strings cut out.

Byte-level BPE splits multi-byte characters (every Chinese character is three bytes) across
tokens, and a random or unlucky model can emit bytes that never become valid UTF-8. Decoding
such a prefix yields U+FFFD, so a delta ending in U+FFFD is held back until later tokens
complete the character. At the end the remainder is flushed exactly as a one-shot decode of all
tokens would produce it, so the concatenated stream always equals the non-stream text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list in a sliding window (O(window) per token, not O(n))."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """The rest of the one-shot decode of every token pushed so far."""
        full = self._decode(self._ids)
        emitted = "".join(self._emitted)
        # Equal prefixes hold by construction: windows start where a decode ended cleanly.
        rest = full[len(emitted) :] if full.startswith(emitted) else ""
        self._emitted.append(rest)
        self._prefix_offset = self._read_offset = len(self._ids)
        return rest


class StopStringMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first match
    (after it with `include`: vLLM's include_stop_str_in_output). Until `armed` (min_tokens),
    a match does not stop: the text goes on, and a stop string is found only once it ends in
    text pushed after arming."""

    def __init__(self, stop: Sequence[str], include: bool = False, armed: bool = True):
        self._stop = [s for s in stop if s]
        self._include = include
        self._pending = ""
        self.armed = armed
        self.stopped = False
        self.matched: str | None = None  # the stop string found (the earliest in the text)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        hits = [(at, stop) for stop in self._stop if (at := self._pending.find(stop)) >= 0]
        if hits and self.armed:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            end = at + len(self.matched) if self._include else at
            out, self._pending = self._pending[:end], ""
            return out
        keep = self._partial_match_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_match_length(self) -> int:
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:length]):
                    best = length
                    break
        return best


class TextAssembler:
    """Token ids in, (text delta, tokens it covers) out; knows when a stop string hit.
    `include_stop`: a stop string stays in the text; `min_tokens`: stop strings count only
    from the text of that many tokens on (vLLM's rule: none ends a choice before)."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop: Sequence[str] = (),
        include_stop: bool = False,
        min_tokens: int = 0,
    ):
        self._detokenizer = IncrementalDetokenizer(decode)
        self._matcher = StopStringMatcher(stop, include_stop, armed=min_tokens <= 1)
        self._min_tokens = min_tokens
        self._unreported_tokens = 0
        self.num_tokens = 0
        self.text_parts: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text; None while none has."""
        return self._matcher.matched

    def push(self, token_id: int, hidden: bool = False) -> tuple[str, int]:
        """`hidden`: the token counts, its text is not shown (a stop token, as vLLM leaves
        EOS and stop_token_ids out of the text unless include_stop_str_in_output)."""
        self.num_tokens += 1
        self._unreported_tokens += 1
        if hidden:
            return "", 0  # its count goes with the next text, or the last chunk
        if self.num_tokens >= self._min_tokens:
            self._matcher.armed = True
        return self._take(self._matcher.push(self._detokenizer.push(token_id)))

    def finish(self) -> tuple[str, int]:
        text = self._matcher.push(self._detokenizer.flush()) + self._matcher.flush()
        return self._take(text, force=True)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def _take(self, text: str, force: bool = False) -> tuple[str, int]:
        if not text and not force:
            return "", 0
        tokens, self._unreported_tokens = self._unreported_tokens, 0
        self.text_parts.append(text)
        return text, tokens
