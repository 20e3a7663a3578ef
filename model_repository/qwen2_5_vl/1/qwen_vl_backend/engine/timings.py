"""Where one request's time went, measured where it is spent (`contract.TIMING_STAGES`).

The engine stamps a request as it moves: arrival at the engine (`submit`), the start and end
of its preparation (with the time its images and videos took to decode, `media_decode`), its
admission into the batch, the vision-tower stages run for its media, and its tokens. The
stages are durations: queue (waiting for a preparation thread, then for a KV slot),
media_decode, preprocess (the rest of preparation: template, resizing, processor, positions),
vision, prefill (admission to the first token, less the vision stages), ttft (the sum of the
five), decode (first token to last) and mean_itl (decode per token after the first, of the
choice that made the most). The vision-tower runs and prompt chunks that served the request are
kept as (start, end) intervals too: a traced request's spans are built from these same
timestamps (engine/tracing.py).

`media_decode` is collected per thread: the decoders add to the preparing thread's counter
(`counts_as_media_decode`), and the engine reads and resets it when preparation ends.
"""

from __future__ import annotations

import functools
import threading
import time

_decoding = threading.local()


def counts_as_media_decode(function):
    """Adds the time `function` takes to the calling thread's media decode time (once: a
    decoder called by another, such as a video's frames by the video's, is not counted again)."""

    @functools.wraps(function)
    def timed(*args, **kwargs):
        if getattr(_decoding, "inside", False):
            return function(*args, **kwargs)
        started, _decoding.inside = time.perf_counter(), True
        try:
            return function(*args, **kwargs)
        finally:
            _decoding.inside = False
            _decoding.seconds = getattr(_decoding, "seconds", 0.0) + time.perf_counter() - started

    return timed


def take_media_decode_seconds() -> float:
    """The calling thread's media decode time since the last call, and a fresh start."""
    seconds = getattr(_decoding, "seconds", 0.0)
    _decoding.seconds = 0.0
    return seconds


class RequestTimings:
    """One request's timestamps (time.monotonic) and stage totals; written on the engine and
    preparation threads before the events the sender reads them after."""

    def __init__(self, arrived: float):
        self.arrived = arrived
        self.prepare_started = self.prepared = self.admitted = arrived
        self.media_decode = 0.0
        self.vision = 0.0
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.most_tokens = 0  # of the choice that generated the most
        self.vision_runs: list[tuple[float, float]] = []  # (start, end) of its tower runs
        self.prefill_chunks: list[tuple[float, float, int]] = []  # (start, end, tokens)

    def vision_ran(self, started: float, ended: float) -> None:
        self.vision += ended - started
        self.vision_runs.append((started, ended))

    def prefill_ran(self, started: float, ended: float, tokens: int) -> None:
        self.prefill_chunks.append((started, ended, tokens))

    def token(self, now: float, generated: int) -> None:
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.most_tokens = max(self.most_tokens, generated)

    def stages(self) -> dict[str, float]:
        """Seconds per stage (`contract.TIMING_STAGES`), each at least 0."""
        first = self.first_token if self.first_token is not None else self.admitted
        last = self.last_token if self.last_token is not None else first
        queue = (self.prepare_started - self.arrived) + (self.admitted - self.prepared)
        preparing = self.prepared - self.prepare_started
        decode = last - first
        stages = {
            "queue": queue,
            "media_decode": self.media_decode,
            "preprocess": preparing - self.media_decode,
            "vision": self.vision,
            "prefill": first - self.admitted - self.vision,
            "ttft": first - self.arrived,
            "decode": decode,
            "mean_itl": decode / (self.most_tokens - 1) if self.most_tokens > 1 else 0.0,
        }
        return {stage: max(0.0, seconds) for stage, seconds in stages.items()}
