"""One async database interface over SQLite and PostgreSQL (SQLAlchemy 2 Core, asyncio).

- SQLite (`sqlite:///path`, the default: a file under --state-dir): WAL, so readers never wait
  for a writer; every transaction starts with BEGIN IMMEDIATE, so two proxy workers on one
  file queue for the write lock at the start (busy_timeout) instead of one failing with
  "database is locked" when a read transaction tries to become a write.
- PostgreSQL (`postgresql://user@host/db`, for several replicas): asyncpg, a small pool.

Tables are SQLAlchemy Core `Table`s on `METADATA`, declared by the module that owns them
(e.g. blobs.py); migrations/ holds the versioned schema changes, applied in order at start
by whichever replica gets there first (an advisory lock on PostgreSQL, the write lock on
SQLite), each recorded in `schema_migrations`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import migrations

log = logging.getLogger("proxy.state")

METADATA = sa.MetaData()

SCHEMA_MIGRATIONS = sa.Table(
    "schema_migrations",
    METADATA,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

# Any constant: the key of the PostgreSQL advisory lock that serializes migrations.
_MIGRATION_LOCK = 0x51_77_E1_5C
# How long a SQLite writer waits for another process's write lock before failing.
_SQLITE_BUSY_MS = 30_000


class DatabaseURLError(ValueError):
    """--database-url names no engine this proxy speaks."""


def async_url(url: str) -> str:
    """The SQLAlchemy async driver URL for a plain sqlite:// or postgresql:// URL."""
    # The messages never repeat the URL: it may hold a password.
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise DatabaseURLError("expected sqlite:///PATH or postgresql://USER@HOST/DB")
    base = scheme.split("+", 1)[0].lower()
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    raise DatabaseURLError(f"the scheme {scheme!r} is neither sqlite nor postgresql")


def sqlite_url(state_dir: str | Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'state.sqlite3'}"


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable database URL>"


class Database:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.dialect = engine.dialect.name  # "sqlite" | "postgresql"

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Database:
        target = async_url(url)
        if target.startswith("sqlite"):
            path = sa.engine.make_url(target).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(target, connect_args={"timeout": _SQLITE_BUSY_MS / 1e3})
            _sqlite_pragmas(engine)
        else:
            engine = create_async_engine(target, pool_size=5, max_overflow=5, pool_pre_ping=True)
        database = cls(engine)
        if migrate:
            await database.migrate()
        return database

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        async with self.engine.begin() as connection:
            yield connection

    async def close(self) -> None:
        await self.engine.dispose()

    async def migrate(self) -> list[int]:
        """Applies the migrations this database lacks, in order; the versions applied."""
        steps = available_migrations()
        applied: list[int] = []
        async with self.begin() as connection:
            if self.dialect == "postgresql":
                await connection.execute(
                    sa.text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                )
            await connection.run_sync(SCHEMA_MIGRATIONS.create, checkfirst=True)
            done = set((await connection.execute(sa.select(SCHEMA_MIGRATIONS.c.version))).scalars())
            for version, name, upgrade in steps:
                if version in done:
                    continue
                await connection.run_sync(upgrade)
                await connection.execute(
                    SCHEMA_MIGRATIONS.insert().values(
                        version=version, name=name, applied_at=time.time()
                    )
                )
                applied.append(version)
        if applied:
            log.info("database schema migrated to version %d", applied[-1])
        return applied

    async def schema_version(self) -> int:
        async with self.begin() as connection:
            version = await connection.scalar(sa.select(sa.func.max(SCHEMA_MIGRATIONS.c.version)))
        return version or 0


def import_table_modules() -> None:
    """Imports every module of proxy/state/, so every table is on METADATA and every
    declaration (`references_blobs`, `expiring`) is made: a sweep that missed one would
    delete blobs still in use."""
    package = __name__.rpartition(".")[0]
    package_path = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package_path)]):
        if info.name != "migrations":
            importlib.import_module(f"{package}.{info.name}")


def available_migrations() -> list[tuple[int, str, object]]:
    """(version, name, upgrade) of every module migrations/vNNNN_name.py, in version order.
    `upgrade(connection)` takes a synchronous SQLAlchemy Connection inside the transaction."""
    found = []
    for info in pkgutil.iter_modules(migrations.__path__):
        if not info.name.startswith("v"):
            continue
        number, _, name = info.name[1:].partition("_")
        module = importlib.import_module(f"{migrations.__name__}.{info.name}")
        found.append((int(number), name, module.upgrade))
    found.sort(key=lambda step: step[0])
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection, _record):
        # Transactions are begun by the "begin" hook below, not by the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL-safe
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def beyond(
    key: tuple[sa.Column, sa.Column], cursor: tuple[float, str], *, descending: bool
) -> sa.ColumnElement[bool]:
    """Rows strictly after `cursor` in (created_at, id) order (a list's `after` page), or
    before it when `descending` (written out: both engines, no row-value comparison needed)."""
    (created, identifier), (at, cursor_id) = key, cursor
    if descending:
        return sa.or_(created < at, sa.and_(created == at, identifier < cursor_id))
    return sa.or_(created > at, sa.and_(created == at, identifier > cursor_id))


def now() -> float:
    """Timestamps are Unix seconds as floats in every table (one clock, both engines)."""
    return time.time()
