"""The proxy's decode sandbox: the pool of worker processes (sandbox.py) that reads image
headers, so no image parser runs in the proxy process. Started with the app, one pool per
proxy worker process; what the proxy reads in-process is a few magic bytes (the contract's
sniffers), never through a decoder library."""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .sandbox import DecodePool, SandboxConfig, describe

log = logging.getLogger("proxy.decode")


@dataclass(frozen=True)
class DecodeSettings:
    """The proxy's decode workers and their limits (flags --decode-*, proxy/config.py)."""

    workers: int = 2
    memory_mib: int = 1024
    cpu_s: int = 10
    worker_tasks: int = 64
    timeout_s: float = 10.0

    def sandbox(self) -> SandboxConfig:
        return SandboxConfig.from_env(
            workers=self.workers,
            memory_mib=self.memory_mib,
            cpu_s=self.cpu_s,
            max_tasks=self.worker_tasks,
            video=False,  # the proxy never opens a video container
        )


_pool: DecodePool | None = None
_settings = DecodeSettings()
_config: SandboxConfig | None = None  # the running pool's
_lock = threading.Lock()


def start(settings: DecodeSettings) -> DecodePool:
    """This process's pool for `settings`: the running one when it was started with the same
    configuration (another app in this process started it: tests make hundreds, and each
    pool's workers cost a Python start and a Pillow import), else a new one in its place."""
    global _pool, _settings, _config
    config = settings.sandbox()
    with _lock:
        _settings = settings
        if _pool is not None and config == _config:
            return _pool
        if _pool is not None:
            _pool.close()
        else:
            atexit.register(stop)
        _config = config
        _pool = DecodePool(config, on_ready=lambda enforced: log.info(describe(config, enforced)))
        return _pool


def pool() -> DecodePool:
    """This process's pool; one with the default settings when the app did not start one."""
    global _pool, _config
    with _lock:
        if _pool is None:
            _config = _settings.sandbox()
            _pool = DecodePool(_config)
            atexit.register(stop)
        return _pool


def timeout_s() -> float:
    return _settings.timeout_s


def stop() -> None:
    global _pool, _config
    with _lock:
        if _pool is not None:
            _pool.close()
            _pool, _config = None, None


async def decode_context(app: web.Application) -> AsyncIterator[None]:
    """The pool runs from the app's start, so its workers start before the first request, to
    the process's exit (atexit), where its workers are stopped."""
    from ..keys import CONFIG_KEY

    start(app[CONFIG_KEY].decode)
    yield
