"""The schema the migrations build equals the live table definitions (proxy/state/), on
SQLite and PostgreSQL (`database_url`, tests/state_fixtures.py)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from proxy.state import db as state_db
from proxy.state.db import METADATA, Database, available_migrations, import_table_modules


def _generic(type_name: str) -> str:
    # SQLite reflects the declared type names back, PostgreSQL its own; compare by family.
    name = type_name.upper()
    for family, words in (
        ("int", ("INT",)),
        ("float", ("FLOAT", "REAL", "DOUBLE", "NUMERIC")),  # PostgreSQL: DOUBLE PRECISION
        ("text", ("CHAR", "TEXT", "STRING", "CLOB", "JSON")),
        ("bytes", ("BLOB", "BINARY", "BYTEA")),
        ("bool", ("BOOL",)),
    ):
        if any(word in name for word in words):
            return family
    return name


def test_migrated_schema_equals_live_tables(database_url):
    import_table_modules()  # every table on METADATA

    async def reflect():
        database = await Database.open(database_url)
        try:
            async with database.begin() as connection:
                return database.engine.dialect, await connection.run_sync(_reflect_all)
        finally:
            await database.close()

    def _reflect_all(connection):
        inspector = sa.inspect(connection)
        return {
            name: {
                column["name"]: (
                    _generic(str(column["type"])),
                    bool(column["primary_key"]),
                    bool(column["nullable"]) and not column["primary_key"],
                )
                for column in inspector.get_columns(name)
                for column in [
                    {
                        **column,
                        "primary_key": column["name"]
                        in inspector.get_pk_constraint(name)["constrained_columns"],
                    }
                ]
            }
            for name in inspector.get_table_names()
        }

    dialect, migrated = asyncio.run(reflect())
    live = {
        name: {
            column.name: (
                _generic(column.type.compile(dialect=dialect)),
                bool(column.primary_key),
                bool(column.nullable) and not column.primary_key,
            )
            for column in table.columns
        }
        for name, table in METADATA.tables.items()
    }
    assert migrated == live


def test_migration_versions_are_unique_and_ordered():
    versions = [version for version, _, _ in available_migrations()]
    assert versions == sorted(set(versions)) and versions[0] == 1


def test_opening_twice_applies_nothing_the_second_time(database_url):
    async def run():
        first = await Database.open(database_url, migrate=False)
        applied = await first.migrate()
        again = await first.migrate()
        version = await first.schema_version()
        await first.close()
        return applied, again, version

    applied, again, version = asyncio.run(run())
    assert applied and again == [] and version == applied[-1]
    assert state_db.async_url("sqlite:///x").startswith("sqlite+aiosqlite")
