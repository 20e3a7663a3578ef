"""Versioned schema changes, `vNNNN_name.py` each with `upgrade(connection)` (a synchronous
SQLAlchemy Connection inside the migration transaction), applied in order by db.migrate.

A migration defines the tables it creates on its own MetaData, as they were at that version,
and never imports the live definitions: those move on, a migration must not.
tests/unit/test_state_schema.py checks that the migrated schema equals the live tables.
"""
