"""Backpressure, deadlines and draining for the generating routes (chat completions,
Responses: every route the table of proxy/app.py declares `Admit.GENERATING`,
proxy/serving/routes.py).

- **Admission**: at most `--max-concurrent-requests` generating requests are in flight. One
  more is refused at once with 429 (`rate_limit_exceeded`, `Retry-After`), before its body is
  read or any image decoded, so a flood costs the proxy a header parse per request, and
  memory stays bounded by (in flight) x (--max-request-bytes).
- **Body**: a declared Content-Length over `--max-request-bytes` is refused (413) before
  reading; the body is then read within `--request-body-timeout-s` (408), so a client that
  trickles its body cannot hold a slot.
- **Deadline**: a generating request has `--request-timeout-s` in all. The Triton stream reports
  it as an error the client can read (504 before headers, an SSE error event and `[DONE]`
  after), as it does a gap longer than `--stream-idle-timeout-s` between model responses;
  shortly after the deadline the handler is cancelled whatever it is waiting for (a client
  that does not read its stream, an image fetch), which cancels the generation in Triton.
- **Stored state** (`Admit.WRITE`, `Admit.UPLOAD`): no in-flight slot and no deadline; 503
  while draining. A WRITE body is read within `--request-body-timeout-s`; an UPLOAD is read
  by its handler in chunks, each within that timeout (`read_within_body_timeout`), and its
  size is the handler's to bound, so `--max-request-bytes` does not apply to it.
- **Draining** (proxy/serving/shutdown.py): `/ready` says 503 and new generating requests get
  503, while admitted ones finish. Those still running when the grace period ends are ended
  with a 503 (`server_shutting_down`, an SSE error event and `[DONE]` once streaming), which
  also cancels their generation in Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from ..error_catalogue import (
    RATE_LIMIT_EXCEEDED,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    SERVER_SHUTTING_DOWN,
    TIMEOUT,
    APIError,
)
from ..errors import REQUEST_ID_KEY
from ..observability.tracing import end_child, start_child
from ..request.limits import MIB
from .routes import Admit, route_of

log = logging.getLogger("proxy")
T = TypeVar("T")

# How long after the deadline the handler is cancelled, when the stream could not report
# the deadline itself (it was not reading from Triton, or its client was not reading).
DEADLINE_BACKSTOP_S = 2.0


@dataclass(frozen=True)
class AdmissionSettings:
    """Each field is the flag `--<field>` (proxy/config.py)."""

    max_concurrent_requests: int = 64
    max_request_bytes: int = 64 * MIB
    request_body_timeout_s: float = 30.0
    request_timeout_s: float = 600.0
    stream_idle_timeout_s: float = 60.0


class Admission:
    """The in-flight generating requests of one app, and whether it is draining."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self.in_flight = 0
        self.draining = False
        self.aborting = False
        self._idle = asyncio.Event()
        self._idle.set()
        # The timeouts of the Triton streams waiting for their next response right now.
        self._waiting: set[asyncio.Timeout] = set()

    def try_enter(self) -> bool:
        if self.in_flight >= self.settings.max_concurrent_requests:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    @contextlib.contextmanager
    def abortable(self, timeout: asyncio.Timeout) -> Iterator[None]:
        """While inside, `abort_streams` expires `timeout` at once."""
        self._waiting.add(timeout)
        try:
            yield
        finally:
            self._waiting.discard(timeout)

    def abort_streams(self) -> None:
        """Ends every admitted completion at its next wait for the model (a 503)."""
        self.aborting = True
        for timeout in list(self._waiting):
            timeout.reschedule(asyncio.get_running_loop().time())

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight, False if that took longer than `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


ADMISSION_KEY = web.AppKey("admission", Admission)
_REFUSED_WHILE_DRAINING = frozenset({Admit.READINESS, Admit.GENERATING, Admit.UPLOAD, Admit.WRITE})
DEADLINE_KEY = web.RequestKey("deadline", float)  # loop.time() the request must end by
_PREPARED_KEY = web.RequestKey("prepared_response", web.StreamResponse)


def install_admission(app: web.Application, settings: AdmissionSettings) -> None:
    app[ADMISSION_KEY] = Admission(settings)
    app.middlewares.append(admission_middleware)
    app.on_response_prepare.append(_note_prepared)


# ---- errors ----------------------------------------------------------------------------


def deadline_exceeded(seconds: float) -> APIError:
    return TIMEOUT(message=f"The request did not complete within {seconds:g} s.")


def stream_stalled(seconds: float) -> APIError:
    return TIMEOUT(message=f"The model sent nothing for {seconds:g} s.")


# ---- the middleware --------------------------------------------------------------------


@web.middleware
async def admission_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    admission = request.app[ADMISSION_KEY]
    settings = admission.settings
    route = route_of(request)
    admit = route.admit if route is not None else Admit.NONE
    if admission.draining and admit in _REFUSED_WHILE_DRAINING:
        raise SERVER_SHUTTING_DOWN()
    length = request.content_length
    if admit is not Admit.UPLOAD and length is not None and length > settings.max_request_bytes:
        # Unread bodies are drained by aiohttp (for at most its lingering time, 10 s), never
        # kept: closing on unread data would reset the connection before the client reads.
        raise REQUEST_TOO_LARGE(limit=settings.max_request_bytes)
    if admit is Admit.WRITE:
        await _read_body(request, settings)
    if admit is not Admit.GENERATING:
        return await handler(request)
    # its span: taking a slot and reading the body (a 429 or a 408 ends it too)
    span = start_child("admission", attributes={"in_flight": admission.in_flight})
    if not admission.try_enter():
        end_child(span)
        raise RATE_LIMIT_EXCEEDED(capacity=settings.max_concurrent_requests)
    loop = asyncio.get_running_loop()
    deadline = request[DEADLINE_KEY] = loop.time() + settings.request_timeout_s
    try:
        async with asyncio.timeout_at(deadline + DEADLINE_BACKSTOP_S):
            try:
                await _read_body(request, settings)
            finally:
                end_child(span)
            return await handler(request)
    except TimeoutError:
        return _past_deadline(request, settings)
    finally:
        admission.leave()


async def _read_body(request: web.Request, settings: AdmissionSettings) -> None:
    """Reads the body now (aiohttp keeps it for the handler's own `read`)."""
    try:
        async with asyncio.timeout(settings.request_body_timeout_s):
            await request.read()
    except TimeoutError:
        raise REQUEST_TIMEOUT(seconds=settings.request_body_timeout_s) from None


async def read_within_body_timeout(request: web.Request, read: Awaitable[T]) -> T:
    """One read of an upload's body (`Admit.UPLOAD`): 408 if the client sends nothing for
    `--request-body-timeout-s`."""
    seconds = request.app[ADMISSION_KEY].settings.request_body_timeout_s
    try:
        async with asyncio.timeout(seconds):
            return await read
    except TimeoutError:
        raise REQUEST_TIMEOUT(seconds=seconds) from None


def _past_deadline(request: web.Request, settings: AdmissionSettings) -> web.StreamResponse:
    request_id = request.get(REQUEST_ID_KEY, "-")
    prepared = request.get(_PREPARED_KEY)
    if prepared is None:
        log.warning("request %s: past its deadline before responding", request_id)
        raise deadline_exceeded(settings.request_timeout_s)
    # Headers went out and the stream could not end itself (its client stopped reading):
    # nothing more can be said on this connection.
    log.warning("request %s: past its deadline mid-stream; closing the connection", request_id)
    if request.transport is not None:
        request.transport.abort()
    return prepared


async def _note_prepared(request: web.Request, response: web.StreamResponse) -> None:
    if DEADLINE_KEY in request:
        request[_PREPARED_KEY] = response


# ---- the Triton stream -----------------------------------------------------------------


async def with_stream_timeouts(
    request: web.Request, chunks: AsyncGenerator[Any, None]
) -> AsyncGenerator[Any, None]:
    """`chunks` within the request's deadline, with at most `stream_idle_timeout_s` between
    two of them (the first may take longer: queueing and prefill); raises APIError 504
    otherwise. Closing this closes `chunks`."""
    admission = request.app[ADMISSION_KEY]
    settings = admission.settings
    loop = asyncio.get_running_loop()
    deadline = request.get(DEADLINE_KEY, loop.time() + settings.request_timeout_s)
    first = True
    try:
        while True:
            if admission.aborting:
                raise SERVER_SHUTTING_DOWN()
            idle_limit = loop.time() + settings.stream_idle_timeout_s
            limit = deadline if first else min(deadline, idle_limit)
            try:
                async with asyncio.timeout_at(limit) as timeout:
                    with admission.abortable(timeout):
                        chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if admission.aborting:
                    raise SERVER_SHUTTING_DOWN() from None
                if limit == deadline:
                    raise deadline_exceeded(settings.request_timeout_s) from None
                raise stream_stalled(settings.stream_idle_timeout_s) from None
            first = False
            yield chunk
    finally:
        await chunks.aclose()
