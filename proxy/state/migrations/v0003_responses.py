"""Stored responses (responses.py): the response objects, their input items, the images those
items refer to (by blob digest), and the lease of background responses."""

import sqlalchemy as sa


def upgrade(connection: sa.Connection) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "responses",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("background", sa.Boolean, nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("heartbeat_at", sa.Float, nullable=True),
        sa.Index("ix_responses_expires_at", "expires_at"),
        sa.Index("ix_responses_status_heartbeat", "status", "heartbeat_at"),
    )
    sa.Table(
        "response_input_items",
        metadata,
        sa.Column(
            "response_id",
            sa.String(64),
            sa.ForeignKey("responses.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.String(64), nullable=False),
        sa.Column("item", sa.Text, nullable=False),
    )
    sa.Table(
        "response_images",
        metadata,
        sa.Column(
            "response_id",
            sa.String(64),
            sa.ForeignKey("responses.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("digest", sa.String(80), primary_key=True),
        sa.Index("ix_response_images_digest", "digest"),
    )
    metadata.create_all(connection)
