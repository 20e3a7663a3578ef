"""Serving `python -m proxy`: one process, or `--workers N` processes on one port.

One event loop spends ~0.18 ms of CPU per streamed token (docs/benchmarks.md "Stream path at
GPU token rates"), so one process tops out at ~5k tokens per second, which one GPU serving a
batch reaches. With `--workers N` each worker is a whole proxy (event loop, Triton channel,
drain) in a fresh interpreter, listening on the same port with SO_REUSEPORT: the kernel
spreads new connections over the workers. The parent serves nothing; it supervises:

- SIGTERM or SIGINT: one SIGTERM to every worker, which drains (proxy/serving/shutdown.py);
  another: SIGTERM again, which stops them at once. Workers ignore SIGINT, so a terminal's
  Ctrl-C, which reaches the whole process group, drains once instead of stopping at once.
- A worker that exits while nothing is stopping is started again, unless it lived less than
  `WORKER_STARTUP_S` (it cannot start: the port is taken, ...): then all stop.
- It exits once every worker has: 0 when all drained, else the first failure's status.
- A worker whose parent is gone (SIGKILL to the parent alone) drains and exits by itself.

What the workers share:
- Readiness: each worker asks Triton whether the model is ready every `READY_POLL_S` and
  writes the answer to its slot of a shared array; /ready, whichever worker answers it, is
  200 only while every worker's last answer was yes. So a load balancer (or
  scripts/stack.py) waits for the worker whose Triton channel connects last, not the first.
- Admission: `--max-concurrent-requests` is the whole proxy's. Each worker counts its
  generating requests in its own slot of an array in shared memory and admits one more only
  while the sum is below the cap (`SharedAdmission`). Only the owner writes a slot, so no
  lock is needed; two workers admitting at the same instant can overshoot by N - 1 at most.
  The parent zeroes a dead worker's slots.
- Metrics: prometheus_client's multiprocess mode. The parent points PROMETHEUS_MULTIPROC_DIR
  at a fresh temporary directory before any worker starts; every worker's metrics write there
  and its /metrics sums them all (proxy/observability/metrics.py). A dead worker's live
  gauges are dropped; its counts stay. The directory is removed at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, MutableSequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from aiohttp import web
from prometheus_client import multiprocess

from ..app import create_app
from ..config import ProxyConfig
from ..error_catalogue import MODEL_NOT_READY
from ..keys import BACKEND_KEY, CONFIG_KEY
from ..observability.logs import configure_logging
from ..observability.metrics import MULTIPROCESS_DIR_ENV
from .admission import ADMISSION_KEY, Admission, AdmissionSettings
from .routes import Admit, Handler, route_of
from .shutdown import CANCEL_GRACE_S, DRAIN_SIGNALS, install_signal_drain

log = logging.getLogger("proxy")

# A worker that exits sooner than this after its start failed to start (port taken, Triton
# channel options refused, ...): starting it again would fail the same way, forever.
WORKER_STARTUP_S = 10.0
# How often each worker asks Triton whether the model is ready, for every worker's /ready:
# a ModelReady call each, and /ready lags a worker's channel by at most this.
READY_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSlot:
    """One worker's place among several: its index, and arrays in shared memory with one
    slot per worker: its generating requests in flight, whether it last saw the model ready."""

    index: int
    in_flight: MutableSequence[int]
    ready: MutableSequence[int]


WORKER_SLOT_KEY = web.AppKey("worker_slot", WorkerSlot)


class SharedAdmission(Admission):
    """Admission whose cap counts the generating requests of every worker."""

    def __init__(self, settings: AdmissionSettings, slot: WorkerSlot) -> None:
        super().__init__(settings)
        self._slot = slot

    def try_enter(self) -> bool:
        counts = self._slot.in_flight
        if sum(counts) >= self.settings.max_concurrent_requests or not super().try_enter():
            return False
        counts[self._slot.index] += 1
        return True

    def leave(self) -> None:
        self._slot.in_flight[self._slot.index] -= 1
        super().leave()


def serve(config: ProxyConfig, slot: WorkerSlot | None = None) -> None:
    """Serve `config` in this process until a signal has drained it; `slot`: as one worker of
    several on a shared port, drained by SIGTERM alone."""
    server = config.server
    app = create_app(config)
    signals = DRAIN_SIGNALS
    if slot is not None:
        as_worker(app, slot)
        signals = (signal.SIGTERM,)
    # The signals drain first (proxy/serving/shutdown.py): not ready, new requests refused,
    # the admitted ones finish within --shutdown-timeout-s. Then run_app stops accepting,
    # cancels what is left, and runs the app's cleanup, which closes the Triton gRPC channel.
    install_signal_drain(app, server.shutdown_timeout_s, signals)
    web.run_app(
        app,
        host=server.host,
        port=server.port,
        reuse_port=slot is not None,
        handle_signals=False,
        shutdown_timeout=CANCEL_GRACE_S,
        # A client that disconnects cancels its handler, so Triton stops generating for it
        # even when no byte is being written (non-stream requests, long prefill).
        handler_cancellation=True,
        # The proxy logs its own line per request (id, status, tokens, duration).
        access_log=None,
        print=None,
    )


def as_worker(app: web.Application, slot: WorkerSlot) -> None:
    """Make `app` (create_app's) one worker of several: the shared cap and readiness, and an
    exit of its own when the parent is gone."""
    app[WORKER_SLOT_KEY] = slot
    app[ADMISSION_KEY] = SharedAdmission(app[ADMISSION_KEY].settings, slot)
    app.middlewares.append(_ready_when_every_worker_is)
    app.cleanup_ctx.append(_report_readiness)  # after the backend's: it asks the backend
    app.on_startup.append(_drain_when_parent_exits)


@web.middleware
async def _ready_when_every_worker_is(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    route = route_of(request)
    if route is not None and route.admit is Admit.READINESS and response.status == 200:
        if not all(request.app[WORKER_SLOT_KEY].ready):
            raise MODEL_NOT_READY()
    return response


async def _report_readiness(app: web.Application) -> AsyncIterator[None]:
    """While the worker runs: the model's readiness, as its own channel sees it, in its slot."""
    slot, backend = app[WORKER_SLOT_KEY], app[BACKEND_KEY]
    model = app[CONFIG_KEY].server.triton_model

    async def poll() -> None:
        while True:
            try:
                ready = await backend.is_ready(model)
            except Exception:  # a failed DNS lookup of --triton-url: not ready either
                ready = False
            slot.ready[slot.index] = int(ready)
            await asyncio.sleep(READY_POLL_S)

    task = asyncio.create_task(poll())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _drain_when_parent_exits(app: web.Application) -> None:
    """A worker whose parent is gone (killed with SIGKILL alone) drains as if signalled,
    instead of serving the port on with no one to stop it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:  # its end of the pipe closed: the sentinel reads EOF
        loop.remove_reader(parent.sentinel)
        log.warning("the parent process is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(parent.sentinel, parent_gone)


def run_workers(config: ProxyConfig) -> int:
    """Start `config.server.workers` workers and supervise them until all have exited; the
    exit status for the parent."""
    metrics_dir = tempfile.mkdtemp(prefix="proxy-metrics-")
    # Read by prometheus_client when a worker imports it: every worker starts after this.
    os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
    try:
        return Supervisor(config, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_main(config: ProxyConfig, slot: WorkerSlot) -> None:
    # The parent forwards every signal as SIGTERM; a terminal's Ctrl-C reaches this process
    # too and must not count as a second signal (stop without draining).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(config.server.log_level, config.server.log_format)
    log.info("worker %d (pid %d) serving", slot.index, os.getpid())
    serve(config, slot)


@dataclass
class Worker:
    process: BaseProcess
    started: float  # time.monotonic()
    signals: int = 0  # SIGTERMs sent to it


class Supervisor:
    """The parent of the workers: starts them, forwards signals, restarts one that died."""

    def __init__(self, config: ProxyConfig, metrics_dir: str) -> None:
        self._config = config
        self._metrics_dir = metrics_dir
        # spawn: a fresh interpreter per worker, which imports prometheus_client after the
        # parent set the metrics directory, and inherits no event loop or gRPC state.
        self._context = multiprocessing.get_context("spawn")
        self._in_flight = self._context.RawArray("i", config.server.workers)
        self._ready = self._context.RawArray("b", config.server.workers)
        self._workers: dict[int, Worker] = {}  # by slot
        self._signals = 0  # signals received, each owed to every worker as a SIGTERM
        self._status = 0

    def run(self) -> int:
        for signum in DRAIN_SIGNALS:
            signal.signal(signum, self._on_signal)
        for index in range(self._config.server.workers):
            self._start(index)
        while self._workers:
            by_sentinel = {worker.process.sentinel: i for i, worker in self._workers.items()}
            for sentinel in multiprocessing.connection.wait(list(by_sentinel)):
                self._reap(by_sentinel[sentinel])
        log.info("all workers have exited")
        return self._status

    def _start(self, index: int) -> None:
        slot = WorkerSlot(index, self._in_flight, self._ready)
        process = self._context.Process(
            target=_worker_main, args=(self._config, slot), name=f"proxy-worker-{index}"
        )
        process.start()
        self._workers[index] = worker = Worker(process, time.monotonic())
        self._catch_up(worker)  # a signal that came while it started

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("%s: SIGTERM to %d workers", signal.Signals(signum).name, len(self._workers))
        self._stop_all()

    def _stop_all(self) -> None:
        self._signals += 1
        for worker in list(self._workers.values()):
            self._catch_up(worker)

    def _catch_up(self, worker: Worker) -> None:
        while worker.signals < self._signals and worker.process.exitcode is None:
            worker.signals += 1
            os.kill(worker.process.pid, signal.SIGTERM)

    def _reap(self, index: int) -> None:
        worker = self._workers.pop(index)
        process = worker.process
        process.join()
        # What it had in flight ended with it (its admission slot, its in-flight gauge), and
        # the proxy is not ready until its successor has seen the model.
        self._in_flight[index] = 0
        self._ready[index] = 0
        multiprocess.mark_process_dead(process.pid, self._metrics_dir)
        status = _exit_status(process.exitcode)
        if self._signals:
            self._status = self._status or status
        elif time.monotonic() - worker.started < WORKER_STARTUP_S:
            log.error("worker %d exited with %d while starting; stopping all", index, status)
            self._status = status or 1
            self._stop_all()
        else:
            log.warning(
                "worker %d (pid %d) exited with %d; starting another", index, process.pid, status
            )
            self._start(index)


def _exit_status(exitcode: int | None) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    if exitcode is None:
        return 1
    return 128 - exitcode if exitcode < 0 else exitcode
