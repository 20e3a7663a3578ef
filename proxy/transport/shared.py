"""One call per key, shared by every caller that asks while it runs (a model's limits, its
adapters, its liveness, its lazy load): the first caller starts it, the others await the same
call, and a caller that gives up (cancelled, timed out, its client gone) leaves it running for
the rest. The key is free again once the call has ended, so the next caller starts a new one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedCalls(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    def join(self, key: Hashable, start: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """The running call for `key`, or a new one of `start()`, shielded from its caller."""
        call = self._running.get(key)
        if call is None:
            call = self._running[key] = asyncio.ensure_future(start())
            call.add_done_callback(lambda done: self._ended(key, done))
        return asyncio.shield(call)

    def _ended(self, key: Hashable, call: asyncio.Future[T]) -> None:
        if self._running.get(key) is call:
            del self._running[key]
        if not call.cancelled():
            call.exception()  # retrieved: a failure its callers all left must not warn

    def cancel(self) -> None:
        for call in list(self._running.values()):
            call.cancel()
