"""Noticing a model process that died in the middle of its streams.

When the Python-backend stub of a decoupled model dies (SIGKILL by the OOM killer, a crash
in native code), Triton 2.51 answers none of the requests the stub held: their gRPC streams
stay open and silent, and Triton's own health endpoints keep saying ready. Only a new request
learns it ("Stub process '<model>_0_0' is not healthy", after Triton's one-second stub health
check). So one watchdog per Triton connection looks at its open streams: once every stream of
a model has been silent for `SILENCE_S` (`FIRST_SILENCE_S` before a stream's first response:
queueing and prefill), it asks the model whether it lives (`probe`, a tiny `describe`
request), and when the answer is that it is dead every stream of that model is cancelled and
ends with 503 `backend_unavailable` (proxy/transport/backend.py), within about two seconds of
the death instead of at `--stream-idle-timeout-s` (or the request's deadline, before the
first token).

Silence is usually healthy (a queue, a long prefill): that costs one `describe` per model each
`SILENCE_S` while it lasts, answered by the model's execute thread, never by a generation
step, and counted by Triton's metrics as an inference of the model. A probe that times out is
no verdict (a busy model); one that cannot reach Triton is (its streams fail with it anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from .shared import SharedCalls

log = logging.getLogger("proxy.backend")

# A response gap this long makes the watchdog ask the model whether it lives (and it asks
# again at most this often while the gap lasts). Tokens arrive every few tens of
# milliseconds; a gap of a second is a long prefill, a queue, or a death.
SILENCE_S = 1.0
# The same before a stream's first response, which waits for the queue and the prefill (a
# long multimodal prompt takes seconds).
FIRST_SILENCE_S = 5.0
# How often the watchdog looks at its streams' gaps.
LOOK_EVERY_S = 0.25

Probe = Callable[[str], Awaitable[bool]]  # model -> False only when it is known dead
Ask = Callable[[str], Awaitable[bool | None]]  # model -> alive, dead, or None: no verdict


class Verdicts:
    """Whether each model lives, from `ask`, shared by the watchdog and readiness: one
    question at a time per model; a live verdict younger than the caller's `fresh_s` is
    reused (each proxy worker polls readiness twice a second, and each question counts as an
    inference in Triton's metrics), a dead one for `SILENCE_S` only (the model may be back);
    an answer that brings no verdict (a slow one: a busy model, or a dead one whose Triton
    answers queued questions a second apart) keeps the last verdict."""

    def __init__(self, ask: Ask) -> None:
        self._ask = ask
        self._asking: SharedCalls[bool] = SharedCalls()
        self._last: dict[str, tuple[float, bool]] = {}  # model -> (when, alive)

    async def lives(self, model: str, fresh_s: float = SILENCE_S) -> bool:
        when, alive = self._last.get(model, (float("-inf"), True))
        if time.monotonic() - when < (fresh_s if alive else SILENCE_S):
            return alive
        return await self._asking.join(model, lambda: self._verdict(model))

    async def _verdict(self, model: str) -> bool:
        answer = await self._ask(model)
        if answer is None:
            return self._last.get(model, (0.0, True))[1]
        self.record(model, alive=answer)
        return answer

    def record(self, model: str, *, alive: bool) -> None:
        """A verdict found elsewhere (a request that Triton refused because the model died)."""
        self._last[model] = (time.monotonic(), alive)

    def close(self) -> None:
        self._asking.cancel()


@dataclass(eq=False)
class WatchedStream:
    """One open Triton stream: when it last heard from the model, and how to end it."""

    model: str
    cancel: Callable[[], object]
    last_response: float = field(default_factory=time.monotonic)  # or when it was opened
    answered: bool = False  # a response came
    dead: bool = False  # the watchdog ended it: its model process is gone

    def heard(self) -> None:
        self.last_response = time.monotonic()
        self.answered = True


class LivenessWatch:
    """The open streams of one Triton connection and the watchdog over them (created inside
    the serving loop; it runs only while streams are open)."""

    def __init__(
        self,
        probe: Probe,
        *,
        silence_s: float = SILENCE_S,
        first_silence_s: float = FIRST_SILENCE_S,
    ) -> None:
        self._probe = probe
        self._silence_s = silence_s
        self._first_silence_s = first_silence_s
        self._streams: set[WatchedStream] = set()
        self._task: asyncio.Task[None] | None = None
        self._asked_at: dict[str, float] = {}  # model -> when the last probe was sent

    @contextlib.contextmanager
    def watching(self, model: str, cancel: Callable[[], object]) -> Iterator[WatchedStream]:
        stream = WatchedStream(model, cancel)
        self._streams.add(stream)
        if self._task is None:
            self._task = asyncio.create_task(self._watch())
        try:
            yield stream
        finally:
            self._streams.discard(stream)

    async def _watch(self) -> None:
        try:
            while self._streams:
                await asyncio.sleep(LOOK_EVERY_S)
                for model in self._models_to_ask(time.monotonic()):
                    self._asked_at[model] = time.monotonic()
                    if not await self._probe(model):
                        self._end_streams(model)
        finally:
            self._task = None

    def _models_to_ask(self, now: float) -> set[str]:
        """The models none of whose streams heard from them lately (one that did proves the
        model lives), not asked within the last `silence_s`."""
        heard = {s.model for s in self._streams if not self._silent(s, now)}
        silent = {s.model for s in self._streams} - heard
        return {m for m in silent if now - self._asked_at.get(m, 0.0) >= self._silence_s}

    def _silent(self, stream: WatchedStream, now: float) -> bool:
        limit = self._silence_s if stream.answered else self._first_silence_s
        return now - stream.last_response >= limit

    def _end_streams(self, model: str) -> None:
        ending = [s for s in self._streams if s.model == model and not s.dead]
        if not ending:
            return
        log.error("model %s: its process is gone; ending its %d open streams", model, len(ending))
        for stream in ending:
            stream.dead = True
            stream.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
