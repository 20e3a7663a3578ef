"""The proxy's decode sandbox: the pool of worker processes (sandbox.py) that reads image
headers, so no image parser runs in the proxy process. Started with the app, one pool per
proxy worker process; what the proxy reads in-process is a few magic bytes (the contract's
sniffers), never through a decoder library."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .sandbox import DecodePool, ProcessPool, SandboxConfig, describe

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


_pool = ProcessPool()
_settings = DecodeSettings()


def start(settings: DecodeSettings) -> DecodePool:
    """This process's pool for `settings` (the running one when its configuration is the same:
    tests start hundreds of apps in one process)."""
    global _settings
    _settings = settings
    config = settings.sandbox()
    return _pool.start(config, on_ready=lambda enforced: log.info(describe(config, enforced)))


def pool() -> DecodePool:
    """This process's pool; one with the default settings when the app did not start one."""
    return _pool.get(lambda: _settings.sandbox())


def timeout_s() -> float:
    return _settings.timeout_s


def stop() -> None:
    _pool.close()


async def decode_context(app: web.Application) -> AsyncIterator[None]:
    """The pool runs from the app's start, so its workers start before the first request, to
    the process's exit (atexit), where its workers are stopped."""
    from ..keys import CONFIG_KEY

    start(app[CONFIG_KEY].decode)
    yield
