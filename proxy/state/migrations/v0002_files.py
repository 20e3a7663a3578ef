"""Files (files.py): uploads to /v1/files and the batches' output and error files; their
bytes are a blob (blobs.py), named by digest."""

import sqlalchemy as sa


def upgrade(connection: sa.Connection) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "files",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        # A tenant's files in creation order (the list and its cursor).
        sa.Index("ix_files_tenant_created", "tenant", "created_at", "id"),
        sa.Index("ix_files_expires_at", "expires_at"),
        sa.Index("ix_files_digest", "digest"),
    )
    metadata.create_all(connection)
