"""Lazy model loading (`--lazy-load`): Triton starts with no model loaded
(`--model-control-mode=explicit`) and the first chat request for a model loads it.

One load task per model is shared by every request that arrives while it runs, so concurrent
first requests cause exactly one load. A request waits at most `timeout_s` (then 503; the
load goes on and a later request waits for the same task); a failed load is forgotten, so
the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging

from ..error_catalogue import MODEL_LOADING
from .backend import Backend

log = logging.getLogger("proxy.loader")


class ModelLoader:
    def __init__(self, backend: Backend, timeout_s: float) -> None:
        self._backend = backend
        self._timeout_s = timeout_s
        self._loaded: set[str] = set()
        self._loading: dict[str, asyncio.Task[None]] = {}

    def is_loaded(self, model: str) -> bool:
        return model in self._loaded

    async def ensure_loaded(self, model: str) -> None:
        """Returns once `model` is loaded; raises APIError 503 on failure or timeout."""
        if model in self._loaded:
            return
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.create_task(self._load(model))
            task.add_done_callback(self._forget)
        try:
            # shield: a waiter that gives up (timeout, client gone) leaves the load running.
            await asyncio.wait_for(asyncio.shield(task), self._timeout_s)
        except TimeoutError:
            raise MODEL_LOADING(timeout_s=self._timeout_s) from None

    async def _load(self, model: str) -> None:
        if await self._backend.is_ready(model):
            log.info("model %r is already loaded in Triton", model)
        else:
            log.info("loading model %r (lazy load, first request)", model)
            await self._backend.load_model(model)
            log.info("model %r loaded", model)
        self._loaded.add(model)

    def _forget(self, task: asyncio.Task[None]) -> None:
        model = next((m for m, t in self._loading.items() if t is task), None)
        if model is not None:
            del self._loading[model]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here too, so a load nobody waits for any more does not warn.
            log.warning("loading model %r failed; the next request retries", model)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
