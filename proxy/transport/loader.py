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
from .shared import SharedCalls

log = logging.getLogger("proxy.loader")


class ModelLoader:
    def __init__(self, backend: Backend, timeout_s: float) -> None:
        self._backend = backend
        self._timeout_s = timeout_s
        self._loaded: set[str] = set()
        self._loading: SharedCalls[None] = SharedCalls()

    def is_loaded(self, model: str) -> bool:
        return model in self._loaded

    async def ensure_loaded(self, model: str) -> None:
        """Returns once `model` is loaded; raises APIError 503 on failure or timeout."""
        if model in self._loaded:
            return
        try:
            # a waiter that gives up (timeout, client gone) leaves the load running
            await asyncio.wait_for(
                self._loading.join(model, lambda: self._load(model)), self._timeout_s
            )
        except TimeoutError:
            raise MODEL_LOADING(timeout_s=self._timeout_s) from None

    async def _load(self, model: str) -> None:
        try:
            if await self._backend.is_ready(model):
                log.info("model %r is already loaded in Triton", model)
            else:
                log.info("loading model %r (lazy load, first request)", model)
                await self._backend.load_model(model)
                log.info("model %r loaded", model)
        except Exception:
            log.warning("loading model %r failed; the next request retries", model)
            raise
        self._loaded.add(model)

    async def close(self) -> None:
        self._loading.cancel()
