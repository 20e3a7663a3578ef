"""What each Triton model allows, learned from the model itself.

The model owns its limits (pixel bounds, images per request, source pixels, aspect ratio,
max_tokens, choices, context length) and applies its `QWEN_VL_*` environment overrides at
load, which config.pbtxt does not show; it answers a `describe` request with them
(proxy/transport/contract.py). The proxy asks once per Triton model, on first use, and again
after the model was reloaded or reported unavailable. Its own flags may only narrow what
the model allows (proxy/request/limits.py, proxy/media/pixels.py).

When the model cannot be asked (Triton down, an older model without `describe`), the
contract's defaults stand in, and the model's own checks stay the last word.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..error_catalogue import APIError
from .contract import ModelLimits
from .shared import SharedCalls

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger("proxy")

# After a failed `describe`, requests use the defaults for this long before it is asked
# again, so a down Triton costs one extra call every few seconds, not one per request.
RETRY_AFTER_FAILURE_S = 5.0
# Errors after which a model may come back with other limits.
OUTAGE_CODES = frozenset({"model_unavailable", "backend_unavailable"})


def narrower(own: float, model: float) -> float:
    """A proxy flag over the model's limit: 0 (the default) means the model's, a value may
    only lower it."""
    return model if own <= 0 else min(own, model)


class ModelLimitsBook:
    """Each Triton model's `ModelLimits`, asked for on first use."""

    def __init__(self, backend: Backend, *, clock=time.monotonic) -> None:  # noqa: F821
        self._backend = backend
        self._clock = clock
        self._known: dict[str, ModelLimits] = {}
        self._failed_at: dict[str, float] = {}
        self._asking: SharedCalls[ModelLimits | None] = SharedCalls()

    def known(self, model: str) -> ModelLimits | None:
        return self._known.get(model)

    async def get(self, model: str) -> ModelLimits:
        """`model`'s limits; the defaults while it cannot be asked."""
        if model in self._known:
            return self._known[model]
        failed_at = self._failed_at.get(model)
        if failed_at is not None and self._clock() - failed_at < RETRY_AFTER_FAILURE_S:
            return ModelLimits()
        # Concurrent first requests share one question.
        limits = await self._asking.join(model, lambda: self._ask(model))
        return limits if limits is not None else ModelLimits()

    async def prefetch(self, models: list[str]) -> None:
        """Asks each model once at start; one that cannot answer yet is asked on first use."""
        for model in models:
            # Triton may still be starting: a failure here is no reason to wait before asking.
            await self._ask(model, at_start=True)

    @contextlib.contextmanager
    def forgotten_on_outage(self, model: str) -> Iterator[None]:
        """Forgets `model`'s limits when the code inside finds it unavailable: it may come
        back reloaded with other settings."""
        try:
            yield
        except APIError as exc:
            if exc.code in OUTAGE_CODES:
                self.forget(model)
            raise

    def forget(self, model: str) -> None:
        """Ask again next time: the model was reloaded or went away."""
        self._known.pop(model, None)
        self._failed_at.pop(model, None)

    async def _ask(self, model: str, at_start: bool = False) -> ModelLimits | None:
        try:
            limits = await self._backend.describe(model)
        except APIError as exc:
            if not at_start:
                log.warning("model %r could not be asked for its limits (%s)", model, exc.message)
                self._failed_at[model] = self._clock()
            return None
        if limits is None:
            # It answers requests but not `describe`: the defaults until it is reloaded.
            limits = ModelLimits()
        self._known[model] = limits
        self._failed_at.pop(model, None)
        log.info("model %r limits: %s", model, limits)
        return limits
