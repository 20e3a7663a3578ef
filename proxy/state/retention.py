"""Expiry of stored objects: tables declare the column holding each row's expiry time with
`expiring`, and `delete_expired` deletes the rows past it (their children go with them through
ON DELETE CASCADE foreign keys). The sweeper (proxy/state/context.py) runs it, then the blob
sweep, every --state-sweep-interval-s. Between sweeps, readers treat a row past its expiry as
gone (`live`), so an expired object is never served.
"""

from __future__ import annotations

import sqlalchemy as sa

from .db import Database, import_table_modules

_EXPIRING: list[sa.Column] = []


def expiring(column: sa.Column) -> sa.Column:
    """Declares `column` (Unix seconds, NULL = never) as its table's expiry time."""
    _EXPIRING.append(column)
    return column


def live(column: sa.Column, at: float) -> sa.ColumnElement[bool]:
    """The rows of `column`'s table not expired at `at`."""
    return sa.or_(column.is_(None), column > at)


async def delete_expired(db: Database, at: float) -> dict[str, int]:
    """Deletes every row expired at `at`, one transaction per table; rows deleted by table."""
    import_table_modules()
    deleted = {}
    for column in _EXPIRING:
        async with db.begin() as connection:
            result = await connection.execute(
                column.table.delete().where(column.is_not(None), column <= at)
            )
        deleted[column.table.name] = result.rowcount
    return deleted
