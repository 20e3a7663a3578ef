"""Graceful shutdown of `python -m proxy`: drain, then stop.

On SIGTERM (or SIGINT) the proxy keeps listening but drains (proxy/serving/admission.py): `/ready`
answers 503, so a load balancer stops routing to it, new chat requests get 503, and the
admitted ones, streams included, go on to their end. Once none is left, or after
`--shutdown-timeout-s` (aligned with tritonserver's `--exit-timeout-secs`, 30 s in
scripts/stack.py, so the proxy never waits for generations Triton has dropped), the requests
still running are ended with a 503 (an SSE error event and `[DONE]` for streams), which
cancels their generations in Triton. Then aiohttp's own shutdown runs: it closes the
listener, gives handlers `CANCEL_GRACE_S` to write those last events, cancels what is left
(a client that does not read), closes the gRPC channel and exits.

A second signal during the drain stops at once (the same cancellation, without waiting).
aiohttp's own signal handling is off (`handle_signals=False` in proxy/serving/workers.py): it
would close the listener first, so `/ready` could not say 503 during the drain. With
`--workers N` the parent turns each signal into a SIGTERM to every worker, and each worker
drains as above.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from .admission import ADMISSION_KEY, Admission

log = logging.getLogger("proxy")

# What run_app's shutdown gives handlers still running after the drain before cancelling
# them (its `shutdown_timeout`): they have had the whole grace period already.
CANCEL_GRACE_S = 1.0
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _graceful_exit() -> None:
    raise GracefulExit()  # run_app catches it and runs its shutdown and cleanup


class Drain:
    """Signal -> drain -> `stop()`; a second signal -> `stop()` at once."""

    def __init__(
        self, admission: Admission, timeout_s: float, stop: Callable[[], None] = _graceful_exit
    ) -> None:
        self._admission = admission
        self._timeout_s = timeout_s
        self._stop = stop
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def on_signal(self, signum: int = signal.SIGTERM) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            log.info("%s: already stopping", name)
            return
        if self._task is None:
            log.info(
                "%s: draining: not ready, refusing new requests, waiting up to %g s for %d "
                "in flight",
                name,
                self._timeout_s,
                self._admission.in_flight,
            )
            self._admission.draining = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
            return
        log.warning("%s again: stopping now, ending %d in flight", name, self._admission.in_flight)
        self._task.cancel()
        self._admission.abort_streams()
        self._finish()

    async def _drain(self) -> None:
        if await self._admission.wait_idle(self._timeout_s):
            log.info("drained: nothing in flight; stopping")
        else:
            log.warning(
                "shutdown timeout (%g s): ending %d requests still in flight",
                self._timeout_s,
                self._admission.in_flight,
            )
            self._admission.abort_streams()
        self._finish()

    def _finish(self) -> None:
        self._stopping = True
        # From a plain callback, so the exit reaches the event loop, not this task.
        asyncio.get_running_loop().call_soon(self._stop)


def install_signal_drain(
    app: web.Application, timeout_s: float, signals: tuple[signal.Signals, ...] = DRAIN_SIGNALS
) -> None:
    """For the process that serves `app`: `signals` start a `Drain`. A worker of several
    (proxy/serving/workers.py) takes SIGTERM alone: its parent turns each signal it gets into
    a SIGTERM to every worker."""

    async def install(app: web.Application) -> None:
        drain = Drain(app[ADMISSION_KEY], timeout_s)
        loop = asyncio.get_running_loop()
        for signum in signals:
            loop.add_signal_handler(signum, drain.on_signal, signum)

    app.on_startup.append(install)
