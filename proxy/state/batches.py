"""The Batch API's state: batches, their lines, and the leases by which proxy processes share
the work (the runner is proxy/api/batches/runner.py).

A batch is a row of `batches`; each line of its input file is a row of `batch_lines`, keyed
(batch, line number), holding the request until it is answered and then its output line. The
output and error files are assembled from those rows at the end, in input order, so a line
answered twice (a slow replica and the one that took its lease over) is in them once: only
the first answer is recorded (`outcome IS NULL` in the same statement), and the batch's counts
move in that same transaction, so they are exact whatever crashed where.

Work is claimed with leases, an owner and an expiry renewed while working:
- phase work, one process per batch: validating the input, finalizing (the files), and
  ending a cancelled or expired batch: `batches.lease_*`;
- lines, any process any line: `batch_lines.lease_*`, claimed a few at a time.
A process that dies holds its leases until they expire; then any other (or itself after a
restart) claims the work. Claims are one transaction each: on PostgreSQL `SELECT … FOR UPDATE
SKIP LOCKED` (two replicas claiming at once take different rows), on SQLite the write lock
every transaction takes at BEGIN (db.py). Every write made under a phase lease checks in the
same transaction that the lease is still the writer's (a fence), so a process that lost its
lease cannot write over its successor.

`sealed` marks a batch whose answers are final: no line is recorded after it, so the files
assembled next and the counts agree. It is set when the last line is answered, and when a
cancelled or expired batch is ended (lines still running then are dropped, as OpenAI does).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .db import METADATA, Database, beyond, now
from .retention import expiring, live

BATCHES = sa.Table(
    "batches",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("metadata_json", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("in_progress_at", sa.Float, nullable=True),
    sa.Column("finalizing_at", sa.Float, nullable=True),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("failed_at", sa.Float, nullable=True),
    sa.Column("cancelling_at", sa.Float, nullable=True),
    sa.Column("cancelled_at", sa.Float, nullable=True),
    sa.Column("expired_at", sa.Float, nullable=True),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("completed", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("errors_json", sa.Text, nullable=True),  # validation errors: OpenAI's `errors.data`
    sa.Column("sealed", sa.Boolean, nullable=False),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    # When the sweeper deletes the batch (its lines go with it): --state-retention-s after
    # its completion window ends, so a running batch is never swept; None: never.
    sa.Column("retained_until", sa.Float, nullable=True),
    sa.Index("batches_by_tenant", "tenant", "created_at"),
    sa.Index("batches_by_status", "status", "created_at"),
    sa.Index("batches_by_retention", "retained_until"),
)
expiring(BATCHES.c.retained_until)

BATCH_LINES = sa.Table(
    "batch_lines",
    METADATA,
    sa.Column(
        "batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("line", sa.Integer, primary_key=True),  # 1-based, as editors number lines
    sa.Column("custom_id", sa.Text, nullable=True),
    sa.Column("request", sa.Text, nullable=True),  # the line's `body`, until it is answered
    sa.Column("outcome", sa.String(16), nullable=True),  # None: not answered yet
    sa.Column("result", sa.Text, nullable=True),  # its output- or error-file line
    sa.Column("attempts", sa.Integer, nullable=False),  # claims so far
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Index("batch_lines_pending", "batch_id", "outcome", "line"),
    sa.Index("batch_lines_by_owner", "lease_owner"),
)

# The endpoints a batch may run, as OpenAI names them.
ENDPOINTS = ("/v1/chat/completions", "/v1/responses")
# OpenAI's only completion window; a batch not done by then expires.
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
# Lines read from the database per query when the files are assembled.
RESULT_PAGE = 256
# The most lines in flight `--batch-concurrency 0` derives. Every batch row costs each engine
# step of the interactive requests beside it on a CPU: bench preset, 0.8 req/s interactive,
# TTFT p50 x1.27 with 4 lines in flight, x2.0 with 8 (docs/state.md "Measured"). A GPU, where a
# decode row is nearly free, takes more (`--batch-concurrency`), up to the model's batch share
# of its slots (max_batch_priority_slots: half).
DERIVED_CONCURRENCY_MAX = 4
# In-progress batches a claim looks into for lines, oldest first.
_CLAIM_BATCHES = 16


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# The statuses whose work one process does under the batch's lease.
LEASED_PHASES = (BatchStatus.VALIDATING, BatchStatus.FINALIZING, BatchStatus.CANCELLING)
CANCELLABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
# The timestamp column each ending status sets.
_ENDED_AT = {
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.CANCELLED: "cancelled_at",
    BatchStatus.EXPIRED: "expired_at",
}


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # a 2xx answer: the output file
    FAILED = "failed"  # an error answer or a bad line: the error file


@dataclass(frozen=True)
class BatchSettings:
    """Each field is the flag `--batch-<field>` (proxy/config.py)."""

    concurrency: int = 0  # 0: derived from the admission cap (lines_in_flight)
    max_lines: int = 50_000
    lease_s: float = 30.0
    poll_s: float = 1.0
    line_attempts: int = 3

    def lines_in_flight(self, max_concurrent_requests: int, workers: int = 1) -> int:
        """The lines one of `workers` processes runs at once: `concurrency`, else half the
        admission cap up to DERIVED_CONCURRENCY_MAX, shared among the workers (at least 1)."""
        whole = self.concurrency or min(
            DERIVED_CONCURRENCY_MAX, max(1, max_concurrent_requests // 2)
        )
        return max(1, whole // workers)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def new_request_id() -> str:
    """The `id` of one output- or error-file line."""
    return f"batch_req_{uuid.uuid4().hex}"


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Batch:
    """One row of `batches`."""

    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    status: BatchStatus
    created_at: float
    expires_at: float
    in_progress_at: float | None
    finalizing_at: float | None
    completed_at: float | None
    failed_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None
    expired_at: float | None
    total: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    sealed: bool

    @classmethod
    def from_row(cls, row: sa.Row) -> Batch:
        values = row._mapping
        return cls(
            **{
                name: values[name]
                for name in cls.__dataclass_fields__
                if name not in ("metadata", "errors", "status")
            },
            metadata=json.loads(values["metadata_json"]) if values["metadata_json"] else None,
            errors=json.loads(values["errors_json"]) if values["errors_json"] else None,
            status=BatchStatus(values["status"]),
        )

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": (
                {"object": "list", "data": self.errors} if self.errors is not None else None
            ),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": str(self.status),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": _seconds(self.in_progress_at),
            "expires_at": _seconds(self.expires_at),
            "finalizing_at": _seconds(self.finalizing_at),
            "completed_at": _seconds(self.completed_at),
            "failed_at": _seconds(self.failed_at),
            "expired_at": _seconds(self.expired_at),
            "cancelling_at": _seconds(self.cancelling_at),
            "cancelled_at": _seconds(self.cancelled_at),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class NewLine:
    """A line as validation stores it: a request to run, or (outcome FAILED) a bad line with
    its error-file line."""

    line: int
    custom_id: str | None
    request: str | None = None
    outcome: Outcome | None = None
    result: str | None = None


@dataclass(frozen=True)
class ClaimedLine:
    """A line a process holds the lease of, to run."""

    batch_id: str
    tenant: str
    endpoint: str
    line: int
    custom_id: str
    request: str
    attempts: int  # this claim included

    @property
    def key(self) -> tuple[str, int]:
        return self.batch_id, self.line


@dataclass(frozen=True)
class Answer:
    """What a line got: its outcome and output- or error-file line, and its tokens."""

    outcome: Outcome
    result: str
    input_tokens: int = 0
    output_tokens: int = 0


class NotCancellable(Exception):
    def __init__(self, status: BatchStatus) -> None:
        super().__init__(status)
        self.status = status


class _Abandon(Exception):
    """Rolls a transaction back: its precondition no longer holds."""


def _lease_free(table: sa.Table, moment: float) -> sa.ColumnElement[bool]:
    return sa.or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < moment)


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- the API's side ----------------------------------------------------------------

    async def create(
        self,
        *,
        tenant: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        retention_s: float = 0.0,
    ) -> Batch:
        """A new batch, validating; kept `retention_s` after its completion window ends
        (0: until deleted)."""
        created = now()
        expires_at = created + COMPLETION_WINDOWS[completion_window]
        values = {
            "id": new_batch_id(),
            "tenant": tenant,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "metadata_json": json.dumps(metadata) if metadata is not None else None,
            "status": BatchStatus.VALIDATING.value,
            "created_at": created,
            "expires_at": expires_at,
            "retained_until": expires_at + retention_s if retention_s else None,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "sealed": False,
        }
        async with self.db.begin() as connection:
            row = (
                await connection.execute(BATCHES.insert().values(**values).returning(BATCHES))
            ).one()
        return Batch.from_row(row)

    async def get(self, tenant: str, batch_id: str) -> Batch | None:
        async with self.db.begin() as connection:
            row = (
                await connection.execute(
                    BATCHES.select().where(
                        BATCHES.c.id == batch_id,
                        BATCHES.c.tenant == tenant,
                        live(BATCHES.c.retained_until, now()),
                    )
                )
            ).one_or_none()
        return None if row is None else Batch.from_row(row)

    async def page(
        self, tenant: str, *, after: str | None, limit: int
    ) -> tuple[list[Batch], bool] | None:
        """The tenant's batches newest first, after the batch `after` (None when it is not
        theirs), at most `limit`; and whether there are more."""
        moment = now()
        query = BATCHES.select().where(
            BATCHES.c.tenant == tenant, live(BATCHES.c.retained_until, moment)
        )
        async with self.db.begin() as connection:
            if after is not None:
                cursor = (
                    await connection.execute(
                        sa.select(BATCHES.c.created_at, BATCHES.c.id).where(
                            BATCHES.c.id == after,
                            BATCHES.c.tenant == tenant,
                            live(BATCHES.c.retained_until, moment),
                        )
                    )
                ).one_or_none()
                if cursor is None:
                    return None
                query = query.where(
                    beyond((BATCHES.c.created_at, BATCHES.c.id), tuple(cursor), descending=True)
                )
            rows = (
                await connection.execute(
                    query.order_by(BATCHES.c.created_at.desc(), BATCHES.c.id.desc()).limit(
                        limit + 1
                    )
                )
            ).all()
        return [Batch.from_row(row) for row in rows[:limit]], len(rows) > limit

    async def request_cancel(self, tenant: str, batch_id: str) -> Batch | None:
        """Marks the batch cancelling (the runner ends it); None when it is not the tenant's;
        NotCancellable once it is past running. Cancelling again changes nothing."""
        async with self.db.begin() as connection:
            row = (
                await connection.execute(
                    BATCHES.select()
                    .where(
                        BATCHES.c.id == batch_id,
                        BATCHES.c.tenant == tenant,
                        live(BATCHES.c.retained_until, now()),
                    )
                    .with_for_update()
                )
            ).one_or_none()
            if row is None:
                return None
            status = BatchStatus(row.status)
            if status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
                return Batch.from_row(row)
            if status not in CANCELLABLE:
                raise NotCancellable(status)
            # The lease goes too: a validation under way stops at its next write (its fence).
            row = (
                await connection.execute(
                    BATCHES.update()
                    .where(BATCHES.c.id == batch_id)
                    .values(
                        status=BatchStatus.CANCELLING.value,
                        cancelling_at=now(),
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    .returning(BATCHES)
                )
            ).one()
        return Batch.from_row(row)

    # ---- phase work under the batch's lease --------------------------------------------

    async def claim_batch(self, owner: str, lease_s: float) -> Batch | None:
        """The oldest batch with phase work and no live lease, now leased to `owner`: one to
        validate, finalize or end after a cancel, or one in progress past its expiry."""
        moment = now()
        wanted = sa.and_(
            sa.or_(
                BATCHES.c.status.in_([status.value for status in LEASED_PHASES]),
                sa.and_(
                    BATCHES.c.status == BatchStatus.IN_PROGRESS.value,
                    BATCHES.c.expires_at <= moment,
                ),
            ),
            _lease_free(BATCHES, moment),
        )
        async with self.db.begin() as connection:
            batch_id = await connection.scalar(
                sa.select(BATCHES.c.id)
                .where(wanted)
                .order_by(BATCHES.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if batch_id is None:
                return None
            row = (
                await connection.execute(
                    BATCHES.update()
                    .where(BATCHES.c.id == batch_id, wanted)
                    .values(lease_owner=owner, lease_expires_at=moment + lease_s)
                    .returning(BATCHES)
                )
            ).one_or_none()
        return None if row is None else Batch.from_row(row)

    def _fence(self, owner: str, batch_id: str, lease_s: float, *statuses: BatchStatus):
        """An UPDATE that renews `owner`'s lease of the batch, matching no row once the lease
        (or the status, when given) is no longer theirs."""
        condition = [BATCHES.c.id == batch_id, BATCHES.c.lease_owner == owner]
        if statuses:
            condition.append(BATCHES.c.status.in_([status.value for status in statuses]))
        return BATCHES.update().where(*condition).values(lease_expires_at=now() + lease_s)

    async def renew_batch(self, owner: str, batch_id: str, lease_s: float) -> bool:
        async with self.db.begin() as connection:
            result = await connection.execute(self._fence(owner, batch_id, lease_s))
        return result.rowcount == 1

    async def release_batch(self, owner: str, batch_id: str) -> None:
        async with self.db.begin() as connection:
            await connection.execute(
                BATCHES.update()
                .where(BATCHES.c.id == batch_id, BATCHES.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def restart_validation(self, owner: str, batch_id: str, lease_s: float) -> bool:
        """Drops the lines an interrupted validation stored; False if the lease is gone."""
        async with self.db.begin() as connection:
            fence = self._fence(owner, batch_id, lease_s, BatchStatus.VALIDATING)
            if (await connection.execute(fence)).rowcount != 1:
                return False
            await connection.execute(BATCH_LINES.delete().where(BATCH_LINES.c.batch_id == batch_id))
        return True

    async def add_lines(
        self, owner: str, batch_id: str, lines: Sequence[NewLine], lease_s: float
    ) -> bool:
        """Stores validated lines (one transaction); False if the lease or status is gone."""
        async with self.db.begin() as connection:
            fence = self._fence(owner, batch_id, lease_s, BatchStatus.VALIDATING)
            if (await connection.execute(fence)).rowcount != 1:
                return False
            if lines:
                await connection.execute(
                    BATCH_LINES.insert(),
                    [
                        {
                            "batch_id": batch_id,
                            "line": line.line,
                            "custom_id": line.custom_id,
                            "request": line.request,
                            "outcome": line.outcome.value if line.outcome else None,
                            "result": line.result,
                            "attempts": 0,
                        }
                        for line in lines
                    ],
                )
        return True

    async def fail_validation(
        self, owner: str, batch_id: str, errors: list[dict[str, Any]], lease_s: float
    ) -> bool:
        """The batch failed validation (`errors`: OpenAI's `errors.data`); no line stays."""
        async with self.db.begin() as connection:
            fence = self._fence(owner, batch_id, lease_s, BatchStatus.VALIDATING)
            if (await connection.execute(fence)).rowcount != 1:
                return False
            await connection.execute(BATCH_LINES.delete().where(BATCH_LINES.c.batch_id == batch_id))
            await connection.execute(
                BATCHES.update()
                .where(BATCHES.c.id == batch_id)
                .values(
                    status=BatchStatus.FAILED.value,
                    failed_at=now(),
                    errors_json=json.dumps(errors),
                    sealed=True,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        return True

    async def finish_validation(
        self, owner: str, batch_id: str, *, total: int, failed: int, lease_s: float
    ) -> bool:
        """Validated: in progress with `total` lines, `failed` of them bad (finalizing at once
        when every line is)."""
        moment = now()
        values: dict[str, Any] = {
            "status": BatchStatus.IN_PROGRESS.value,
            "in_progress_at": moment,
            "total": total,
            "failed": failed,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if failed >= total:
            values.update(status=BatchStatus.FINALIZING.value, finalizing_at=moment, sealed=True)
        async with self.db.begin() as connection:
            fence = self._fence(owner, batch_id, lease_s, BatchStatus.VALIDATING)
            if (await connection.execute(fence)).rowcount != 1:
                return False
            await connection.execute(
                BATCHES.update().where(BATCHES.c.id == batch_id).values(**values)
            )
        return True

    async def seal(
        self, owner: str, batch_id: str, lease_s: float, *, expire: bool
    ) -> Batch | None:
        """No line is recorded from now on; with `expire`, the lines not answered yet count as
        failed (the error file says they expired). None if the lease is gone."""
        async with self.db.begin() as connection:
            if (await connection.execute(self._fence(owner, batch_id, lease_s))).rowcount != 1:
                return None
            values: dict[str, Any] = {"sealed": True}
            if expire:
                expired = await connection.execute(
                    BATCH_LINES.update()
                    .where(BATCH_LINES.c.batch_id == batch_id, BATCH_LINES.c.outcome.is_(None))
                    .values(
                        outcome=Outcome.FAILED.value,
                        request=None,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                )
                values["failed"] = BATCHES.c.failed + expired.rowcount
            row = (
                await connection.execute(
                    BATCHES.update()
                    .where(BATCHES.c.id == batch_id)
                    .values(**values)
                    .returning(BATCHES)
                )
            ).one()
        return Batch.from_row(row)

    async def iter_results(
        self, batch_id: str, outcome: Outcome
    ) -> AsyncIterator[tuple[int, str | None, str | None]]:
        """(line, custom_id, result) of the lines with `outcome`, in input order, a page per
        query (no transaction is held between pages)."""
        last = 0
        while True:
            async with self.db.begin() as connection:
                rows = (
                    await connection.execute(
                        sa.select(BATCH_LINES.c.line, BATCH_LINES.c.custom_id, BATCH_LINES.c.result)
                        .where(
                            BATCH_LINES.c.batch_id == batch_id,
                            BATCH_LINES.c.outcome == outcome.value,
                            BATCH_LINES.c.line > last,
                        )
                        .order_by(BATCH_LINES.c.line)
                        .limit(RESULT_PAGE)
                    )
                ).all()
            for row in rows:
                yield row.line, row.custom_id, row.result
            if len(rows) < RESULT_PAGE:
                return
            last = rows[-1].line

    async def set_file(
        self, owner: str, batch_id: str, column: str, file_id: str, lease_s: float
    ) -> bool:
        """Records the output or error file (`column`: output_file_id, error_file_id)."""
        async with self.db.begin() as connection:
            result = await connection.execute(
                self._fence(owner, batch_id, lease_s).values(**{column: file_id})
            )
        return result.rowcount == 1

    async def end(self, owner: str, batch_id: str, status: BatchStatus, lease_s: float) -> bool:
        """The batch ends in `status`; its lines go (their answers are in the files)."""
        async with self.db.begin() as connection:
            ended = await connection.execute(
                self._fence(owner, batch_id, lease_s).values(
                    status=status.value,
                    sealed=True,
                    lease_owner=None,
                    lease_expires_at=None,
                    **{_ENDED_AT[status]: now()},
                )
            )
            if ended.rowcount != 1:
                return False
            await connection.execute(BATCH_LINES.delete().where(BATCH_LINES.c.batch_id == batch_id))
        return True

    # ---- lines, under their own leases -------------------------------------------------

    async def claim_lines(self, owner: str, limit: int, lease_s: float) -> list[ClaimedLine]:
        """Up to `limit` unanswered lines with no live lease, of running batches oldest first,
        now leased to `owner` (each claim counts an attempt)."""
        claimed: list[ClaimedLine] = []
        moment = now()
        async with self.db.begin() as connection:
            batches = (
                await connection.execute(
                    sa.select(BATCHES.c.id, BATCHES.c.tenant, BATCHES.c.endpoint)
                    .where(
                        BATCHES.c.status == BatchStatus.IN_PROGRESS.value,
                        sa.not_(BATCHES.c.sealed),
                        BATCHES.c.expires_at > moment,
                    )
                    .order_by(BATCHES.c.created_at)
                    .limit(_CLAIM_BATCHES)
                )
            ).all()
            for batch in batches:
                wanted = limit - len(claimed)
                if wanted <= 0:
                    break
                rows = (
                    await connection.execute(
                        sa.select(
                            BATCH_LINES.c.line,
                            BATCH_LINES.c.custom_id,
                            BATCH_LINES.c.request,
                            BATCH_LINES.c.attempts,
                        )
                        .where(
                            BATCH_LINES.c.batch_id == batch.id,
                            BATCH_LINES.c.outcome.is_(None),
                            _lease_free(BATCH_LINES, moment),
                        )
                        .order_by(BATCH_LINES.c.line)
                        .limit(wanted)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
                if not rows:
                    continue
                await connection.execute(
                    BATCH_LINES.update()
                    .where(
                        BATCH_LINES.c.batch_id == batch.id,
                        BATCH_LINES.c.line.in_([row.line for row in rows]),
                    )
                    .values(
                        lease_owner=owner,
                        lease_expires_at=moment + lease_s,
                        attempts=BATCH_LINES.c.attempts + 1,
                    )
                )
                claimed.extend(
                    ClaimedLine(
                        batch.id,
                        batch.tenant,
                        batch.endpoint,
                        row.line,
                        row.custom_id,
                        row.request,
                        row.attempts + 1,
                    )
                    for row in rows
                )
        return claimed

    async def renew_lines(self, owner: str, lease_s: float) -> set[str]:
        """Renews `owner`'s line leases; the batches among them no longer running (cancelled,
        expired), whose lines the owner should stop."""
        async with self.db.begin() as connection:
            await connection.execute(
                BATCH_LINES.update()
                .where(BATCH_LINES.c.lease_owner == owner, BATCH_LINES.c.outcome.is_(None))
                .values(lease_expires_at=now() + lease_s)
            )
            stopped = await connection.execute(
                sa.select(BATCH_LINES.c.batch_id)
                .distinct()
                .join(BATCHES, BATCHES.c.id == BATCH_LINES.c.batch_id)
                .where(
                    BATCH_LINES.c.lease_owner == owner,
                    BATCH_LINES.c.outcome.is_(None),
                    sa.or_(BATCHES.c.sealed, BATCHES.c.status != BatchStatus.IN_PROGRESS.value),
                )
            )
            return set(stopped.scalars())

    async def release_all(self, owner: str) -> None:
        """Gives back every lease `owner` holds, its lines' attempts refunded (a runner that
        stops: what it claimed, whether or not it had started it, is another's to run)."""
        async with self.db.begin() as connection:
            await connection.execute(
                BATCH_LINES.update()
                .where(BATCH_LINES.c.lease_owner == owner, BATCH_LINES.c.outcome.is_(None))
                .values(
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=BATCH_LINES.c.attempts - 1,
                )
            )
            await connection.execute(
                BATCHES.update()
                .where(BATCHES.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def release_lines(
        self, owner: str, keys: Sequence[tuple[str, int]], *, refund_attempt: bool
    ) -> None:
        """Gives leases back unanswered (the process stops); `refund_attempt`: the attempt
        does not count (the line never reached the model's answer)."""
        if not keys:
            return
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
        if refund_attempt:
            values["attempts"] = BATCH_LINES.c.attempts - 1
        async with self.db.begin() as connection:
            for batch_id, line in keys:
                await connection.execute(
                    BATCH_LINES.update()
                    .where(
                        BATCH_LINES.c.batch_id == batch_id,
                        BATCH_LINES.c.line == line,
                        BATCH_LINES.c.lease_owner == owner,
                        BATCH_LINES.c.outcome.is_(None),
                    )
                    .values(**values)
                )

    async def record(self, batch_id: str, line: int, answer: Answer) -> bool:
        """Records a line's answer and counts it, unless it has one already or the batch is
        sealed (False); the last answer of a running batch moves it to finalizing."""
        completed = int(answer.outcome is Outcome.COMPLETED)
        try:
            async with self.db.begin() as connection:
                # The batch's row first: on PostgreSQL its lock orders this after a seal.
                counted = await connection.execute(
                    BATCHES.update()
                    .where(BATCHES.c.id == batch_id, sa.not_(BATCHES.c.sealed))
                    .values(
                        completed=BATCHES.c.completed + completed,
                        failed=BATCHES.c.failed + (1 - completed),
                        input_tokens=BATCHES.c.input_tokens + answer.input_tokens,
                        output_tokens=BATCHES.c.output_tokens + answer.output_tokens,
                    )
                )
                if counted.rowcount != 1:
                    return False
                answered = await connection.execute(
                    BATCH_LINES.update()
                    .where(
                        BATCH_LINES.c.batch_id == batch_id,
                        BATCH_LINES.c.line == line,
                        BATCH_LINES.c.outcome.is_(None),
                    )
                    .values(
                        outcome=answer.outcome.value,
                        result=answer.result,
                        request=None,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                )
                if answered.rowcount != 1:
                    raise _Abandon  # answered already: the counts must not move
                moment = now()
                await connection.execute(
                    BATCHES.update()
                    .where(
                        BATCHES.c.id == batch_id,
                        BATCHES.c.status == BatchStatus.IN_PROGRESS.value,
                        BATCHES.c.completed + BATCHES.c.failed >= BATCHES.c.total,
                    )
                    .values(
                        status=BatchStatus.FINALIZING.value,
                        finalizing_at=moment,
                        sealed=True,
                    )
                )
        except _Abandon:
            return False
        return True

    async def line_counts(self, batch_id: str) -> dict[str | None, int]:
        """Lines by outcome (None: not answered yet), for checks and tests."""
        async with self.db.begin() as connection:
            rows = await connection.execute(
                sa.select(BATCH_LINES.c.outcome, sa.func.count())
                .where(BATCH_LINES.c.batch_id == batch_id)
                .group_by(BATCH_LINES.c.outcome)
            )
            return {outcome: count for outcome, count in rows.all()}
