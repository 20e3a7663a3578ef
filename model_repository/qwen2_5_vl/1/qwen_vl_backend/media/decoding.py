"""The model's decode sandbox: one pool of worker processes (sandbox.py) per model process,
started at initialize while the weights load, and the mapping of its outcomes to errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import EngineFullError, RequestError
from .sandbox import (
    DecodeFailed,
    DecodePool,
    ProcessPool,
    Refused,
    SandboxBusy,
    SandboxConfig,
    describe,
)

if TYPE_CHECKING:
    from ..settings import ModelSettings

_pool = ProcessPool()


def sandbox_config(settings: ModelSettings | None) -> SandboxConfig:
    if settings is None:
        return SandboxConfig.from_env()
    return SandboxConfig.from_env(
        workers=settings.decode_workers,
        memory_mib=settings.decode_memory_mib,
        cpu_s=settings.decode_cpu_s,
        max_tasks=settings.decode_worker_tasks,
    )


def configure(settings: ModelSettings) -> DecodePool:
    """Start this process's pool (replacing one started with other settings)."""
    config = sandbox_config(settings)
    log = logging.getLogger("qwen_vl_backend")
    return _pool.start(config, on_ready=lambda enforced: log.info(describe(config, enforced)))


def pool() -> DecodePool:
    """The pool; one with the default settings when none was configured (tools, tests)."""
    return _pool.get(lambda: sandbox_config(None))


def shutdown() -> None:
    _pool.close()


# What each task's pixels must look like: (dimensions, metadata numbers).
_SHAPES = {"image": (3, 0), "frames": (4, 2), "video": (4, 2)}


def run(task: str, data: bytes, args: dict, timeout_s: float, param: str, kind: str):
    """`task` on `data` in a worker: (RGB pixels, metadata numbers); every failure a
    fixed-text error naming `param` (`kind`: "image" or "video", for the error code)."""
    failed = RequestError(f"{kind} could not be decoded", param, f"invalid_{kind}")
    try:
        pixels, meta = pool().run(task, data, args, timeout_s)
    except Refused as exc:
        raise RequestError(exc.message, param, exc.code) from None
    except DecodeFailed:
        raise failed from None
    except SandboxBusy:
        raise EngineFullError("every media decoder is busy; retry later") from None
    ndim, numbers = _SHAPES[task]
    # A worker is not trusted: an answer of another shape is a failed decode, not a crash here.
    if pixels is None or pixels.ndim != ndim or pixels.shape[-1] != 3 or len(meta) != numbers:
        raise failed
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in meta):
        raise failed
    return pixels, meta
