"""Durable state: stored responses, files and batches, in SQLite (embedded default) or
PostgreSQL (several proxy replicas), behind one async interface (db.py) with versioned
migrations (migrations/) and content-addressed blobs streamed in chunks (blobs.py)."""
