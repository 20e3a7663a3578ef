"""The batch runner: one per proxy process, all of them sharing the work through the database
(proxy/state/batches.py has the leases and why they make the work crash-safe).

Each runner, every `--batch-poll-s` or when woken (a batch was created here, a line ended):
- claims one batch with phase work and does it in a task of its own: validating its input
  file (streamed chunk by chunk, a line at a time, stored in transactions of a few hundred
  lines), or finalizing it (the output and error files assembled from the lines' rows in
  input order), or ending a cancelled or expired one;
- claims as many lines as it has room for and runs each through its endpoint's route handler
  in-process (execute.py), at the `batch` priority, recording each answer as it comes.

Room: at most its share of `--batch-concurrency` lines at once, and each line holds one of the
proxy's admission slots (`--max-concurrent-requests`, counted with interactive requests, so
Triton never gets more from this proxy than that cap); a line waits for a slot rather than
taking a 429. `--batch-concurrency` is below the cap, so interactive requests always have
room.

Leases are renewed every third of `--batch-lease-s` while the work goes on. A line the model
could not take (503, 429: Triton restarting, the model loading) is retried with backoff, not
failed; a line whose claims reach `--batch-line-attempts` without an answer (the proxy died
running it each time) is failed, so one request that kills the proxy cannot stall its batch.
While the proxy drains (SIGTERM) nothing new is claimed; lines in flight finish within the
drain, and whatever is left is given back at shutdown for another process to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ...error_catalogue import (
    BATCH_EXPIRED,
    BATCH_TOO_LARGE,
    DUPLICATE_CUSTOM_ID,
    EMPTY_FILE,
    INPUT_FILE_NOT_FOUND,
    LINE_ATTEMPTS_EXHAUSTED,
    APIError,
)
from ...errors import json_dumps
from ...serving.admission import Admission
from ...state.batches import (
    Answer,
    Batch,
    BatchSettings,
    BatchStatus,
    BatchStore,
    ClaimedLine,
    NewLine,
    Outcome,
    new_request_id,
)
from .execute import LineResponse
from .lines import BadLine, is_blank, parse_line, shown, split_lines

log = logging.getLogger("proxy.batches")

# Lines stored per transaction while validating: short transactions, and a 50,000-line file
# in about a hundred of them; fewer when their requests add up to VALIDATION_BYTES.
VALIDATION_ROWS = 500
VALIDATION_BYTES = 8 * 1024 * 1024
# Validation errors listed in a failed batch's `errors` (a file of duplicates names the first).
MAX_LISTED_ERRORS = 100
# A line the model could not take is tried again after this, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
# Answers that say "not now" rather than "no": Triton unreachable or restarting, the model
# loading or not ready, the server at capacity.
RETRYABLE_STATUSES = frozenset({429, 502, 503})
# How often a line waiting for an admission slot looks again.
ADMISSION_POLL_S = 0.05
OUTPUT_PURPOSE = "batch_output"

LineExecutor = Callable[[ClaimedLine], Awaitable[LineResponse]]


class FileMissing(Exception):
    """The batch's input file is gone (deleted before it was validated)."""


class BatchFiles(Protocol):
    """The files the runner reads and writes (the Files API's store)."""

    def content(self, tenant: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; FileMissing when it is not there."""
        ...

    async def create(
        self, tenant: str, *, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> str:
        """A new file of `tenant` with what `chunks` yields; its id."""
        ...


class LeaseLost(Exception):
    """Another process holds the batch now (this one was too slow), or it was cancelled."""


def runner_owner() -> str:
    """This runner's name in leases: unique, and readable in the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def error_line(custom_id: str | None, error: APIError) -> str:
    """An error-file line for a request that got no response (OpenAI's format)."""
    return json_dumps(
        {
            "id": new_request_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": error.code, "message": error.message},
        }
    )


def answer_of(line: ClaimedLine, response: LineResponse) -> Answer:
    """The output-file line (2xx) or error-file line (an error response) of an answer."""
    result = json_dumps(
        {
            "id": new_request_id(),
            "custom_id": line.custom_id,
            "response": {
                "status_code": response.status,
                "request_id": response.request_id,
                "body": response.body,
            },
            "error": None,
        }
    )
    outcome = Outcome.COMPLETED if 200 <= response.status < 300 else Outcome.FAILED
    return Answer(outcome, result, response.input_tokens, response.output_tokens)


def _validation_error(error: APIError, line: int | None = None) -> dict[str, Any]:
    return {"code": error.code, "message": error.message, "param": error.param, "line": line}


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        files: BatchFiles,
        execute: LineExecutor,
        settings: BatchSettings,
        *,
        admission: Admission,
        concurrency: int,
        max_line_bytes: int,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.execute = execute
        self.settings = settings
        self.admission = admission
        self.concurrency = concurrency
        self.max_line_bytes = max_line_bytes
        self.owner = owner or runner_owner()
        self._wakeup = asyncio.Event()
        self._lines: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._phase: asyncio.Task[None] | None = None
        self._phase_batch: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="batch-claims"),
            asyncio.create_task(self._renew_loop(), name="batch-leases"),
        ]

    async def stop(self) -> None:
        """Stops claiming, cancels the work under way and gives its leases back."""
        for task in self._tasks:
            task.cancel()
        work = [*self._tasks, *self._lines.values(), *([self._phase] if self._phase else [])]
        for task in work:
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        try:
            await self.store.release_all(self.owner)
        except Exception:  # the database may be gone too: the leases then expire
            log.warning("batch runner %s: could not give its leases back", self.owner)

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def running_lines(self) -> int:
        return len(self._lines)

    # ---- claiming ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self._claim()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner: claiming work failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.settings.poll_s)

    async def _claim(self) -> None:
        if self.admission.draining:
            return
        if self._phase is None:
            batch = await self.store.claim_batch(self.owner, self.settings.lease_s)
            if batch is not None:
                self._phase_batch = batch.id
                self._phase = asyncio.create_task(self._phase_work(batch))
        room = self.concurrency - len(self._lines)
        if room > 0:
            for line in await self.store.claim_lines(self.owner, room, self.settings.lease_s):
                self._lines[line.key] = asyncio.create_task(self._run_line(line))

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("batch runner: renewing leases failed", exc_info=True)

    async def _renew(self) -> None:
        if self._lines:
            stopped = await self.store.renew_lines(self.owner, self.settings.lease_s)
            for (batch_id, _line), task in list(self._lines.items()):
                if batch_id in stopped:  # cancelled or expired: its answers are not wanted
                    task.cancel()
        if self._phase is not None and self._phase_batch is not None:
            if not await self.store.renew_batch(
                self.owner, self._phase_batch, self.settings.lease_s
            ):
                self._phase.cancel()

    # ---- phase work ----------------------------------------------------------------------

    async def _phase_work(self, batch: Batch) -> None:
        try:
            if batch.status is BatchStatus.VALIDATING:
                await self._validate(batch)
            elif batch.status is BatchStatus.FINALIZING:
                await self._finish(batch, BatchStatus.COMPLETED)
            elif batch.status is BatchStatus.CANCELLING:
                await self._finish(batch, BatchStatus.CANCELLED)
            else:  # in progress past its completion window
                await self._finish(batch, BatchStatus.EXPIRED)
        except LeaseLost:
            log.info("batch %s: no longer this runner's (cancelled, or taken over)", batch.id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: %s failed; it will be tried again", batch.id, batch.status)
            await self.store.release_batch(self.owner, batch.id)
        finally:
            self._phase = None
            self._phase_batch = None
            self.wake()

    async def _validate(self, batch: Batch) -> None:
        """Reads the input file line by line into the batch's lines; a duplicate custom_id
        (or an empty or too long file) fails the batch, a bad line is an error-file entry."""
        lease_s = self.settings.lease_s
        if not await self.store.restart_validation(self.owner, batch.id, lease_s):
            raise LeaseLost
        total = bad = 0
        first_line: dict[bytes, int] = {}  # custom_id digest -> its line: bounded per line
        errors: list[dict[str, Any]] = []
        pending: list[NewLine] = []
        pending_bytes = 0
        try:
            chunks = self.files.content(batch.tenant, batch.input_file_id)
            async for number, raw in split_lines(chunks, self.max_line_bytes):
                if is_blank(raw):
                    continue
                total += 1
                if total > self.settings.max_lines:
                    errors = [_validation_error(BATCH_TOO_LARGE(limit=self.settings.max_lines))]
                    break
                parsed = parse_line(number, raw, batch.endpoint, self.max_line_bytes)
                if parsed.custom_id is not None:
                    digest = hashlib.sha256(
                        parsed.custom_id.encode("utf-8", "surrogatepass")
                    ).digest()
                    first = first_line.setdefault(digest, number)
                    if first != number:
                        if len(errors) < MAX_LISTED_ERRORS:
                            error = DUPLICATE_CUSTOM_ID(
                                "custom_id",
                                custom_id=shown(parsed.custom_id),
                                line=number,
                                first=first,
                            )
                            errors.append(_validation_error(error, number))
                        continue
                if errors:
                    continue  # failing: only more errors are of use
                if isinstance(parsed, BadLine):
                    bad += 1
                    result = error_line(parsed.custom_id, parsed.error)
                    pending.append(NewLine(number, parsed.custom_id, None, Outcome.FAILED, result))
                else:
                    pending.append(NewLine(number, parsed.custom_id, parsed.body))
                    pending_bytes += len(parsed.body)
                if len(pending) >= VALIDATION_ROWS or pending_bytes >= VALIDATION_BYTES:
                    await self._store_lines(batch, pending)
                    pending, pending_bytes = [], 0
        except FileMissing:
            errors = [_validation_error(INPUT_FILE_NOT_FOUND(file_id=batch.input_file_id))]
        if not errors and total == 0:
            errors = [_validation_error(EMPTY_FILE())]
        if errors:
            if not await self.store.fail_validation(self.owner, batch.id, errors, lease_s):
                raise LeaseLost
            log.info("batch %s failed validation: %s", batch.id, errors[0]["message"])
            return
        await self._store_lines(batch, pending)
        if not await self.store.finish_validation(
            self.owner, batch.id, total=total, failed=bad, lease_s=lease_s
        ):
            raise LeaseLost
        log.info("batch %s: %d requests (%d bad lines), in progress", batch.id, total, bad)

    async def _store_lines(self, batch: Batch, lines: list[NewLine]) -> None:
        if not await self.store.add_lines(self.owner, batch.id, lines, self.settings.lease_s):
            raise LeaseLost

    async def _finish(self, batch: Batch, status: BatchStatus) -> None:
        """Seals the batch, writes its output and error files, and ends it in `status`."""
        lease_s = self.settings.lease_s
        expire = status is BatchStatus.EXPIRED
        sealed = await self.store.seal(self.owner, batch.id, lease_s, expire=expire)
        if sealed is None:
            raise LeaseLost
        # A finalization that crashed after writing a file recorded it: not written twice.
        for outcome, column, written in (
            (Outcome.COMPLETED, "output_file_id", sealed.output_file_id),
            (Outcome.FAILED, "error_file_id", sealed.error_file_id),
        ):
            if written is not None:
                continue
            file_id = await self._write_file(sealed, outcome)
            if file_id is not None and not await self.store.set_file(
                self.owner, batch.id, column, file_id, lease_s
            ):
                raise LeaseLost
        if not await self.store.end(self.owner, batch.id, status, lease_s):
            raise LeaseLost
        log.info(
            "batch %s %s: %d completed, %d failed of %d",
            batch.id,
            status,
            sealed.completed,
            sealed.failed,
            sealed.total,
        )

    async def _write_file(self, batch: Batch, outcome: Outcome) -> str | None:
        """The output (COMPLETED) or error (FAILED) file, its lines in input order; None when
        it would be empty."""
        rows = aiter(self.store.iter_results(batch.id, outcome))
        first = await anext(rows, None)
        if first is None:
            return None

        def encoded(row: tuple[int, str | None, str | None]) -> bytes:
            _line, custom_id, result = row
            if result is None:  # not answered before the batch expired
                result = error_line(custom_id, BATCH_EXPIRED())
            return (result + "\n").encode("utf-8", "surrogatepass")

        async def chunks() -> AsyncIterator[bytes]:
            yield encoded(first)
            async for row in rows:
                yield encoded(row)

        name = "output" if outcome is Outcome.COMPLETED else "errors"
        return await self.files.create(
            batch.tenant,
            filename=f"{batch.id}_{name}.jsonl",
            purpose=OUTPUT_PURPOSE,
            chunks=chunks(),
        )

    # ---- lines ---------------------------------------------------------------------------

    async def _run_line(self, line: ClaimedLine) -> None:
        try:
            if line.attempts > self.settings.line_attempts:
                error = LINE_ATTEMPTS_EXHAUSTED(attempts=line.attempts - 1)
                answer = Answer(Outcome.FAILED, error_line(line.custom_id, error))
            else:
                answer = await self._answer(line)
            if answer is None:  # draining: another process (or the restart) runs it
                await self.store.release_lines(self.owner, [line.key], refund_attempt=True)
            else:
                await self.store.record(line.batch_id, line.line, answer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s line %d failed; it will be tried again", *line.key)
            with contextlib.suppress(Exception):
                await self.store.release_lines(self.owner, [line.key], refund_attempt=False)
        finally:
            self._lines.pop(line.key, None)
            self.wake()

    async def _answer(self, line: ClaimedLine) -> Answer | None:
        delay = RETRY_FIRST_S
        while True:
            if not await self._enter_admission():
                return None
            try:
                response = await self.execute(line)
            finally:
                self.admission.leave()
            if response.status not in RETRYABLE_STATUSES:
                return answer_of(line, response)
            if self.admission.draining:
                return None
            log.info(
                "batch %s line %d: %d %s; trying again in %g s",
                *line.key,
                response.status,
                response.error_code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _enter_admission(self) -> bool:
        """Takes one of the proxy's admission slots, waiting for one; False when draining."""
        while not self.admission.draining:
            if self.admission.try_enter():
                return True
            await asyncio.sleep(ADMISSION_POLL_S)
        return False
