"""stored blobs: instance and result bytes in the database (storage_backend = "postgresql")

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

With the PostgreSQL storage backend (daemon/blobstore.py) no machine needs a shared
filesystem: the receiver commits an instance's bytes in the transaction of its row, a
worker stores its result objects' bytes in the transaction of its result, and every
machine reads them from here. The table exists on SQLite too (and stays empty there).

The bytes column is stored EXTERNAL on PostgreSQL: out of line in TOAST, without the
compression that EXTENDED applies first. On a 300-slice CT, pglz cut the receiver's rate
2.7-4 times and lz4 1.7-2.2 times, for a third less space (docs/internals.md has the figures).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stored_blobs",
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_stored_blobs")),
    )
    op.create_index(op.f("ix_stored_blobs_study_instance_uid"), "stored_blobs", ["study_instance_uid"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE stored_blobs ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_index(op.f("ix_stored_blobs_study_instance_uid"), table_name="stored_blobs")
    op.drop_table("stored_blobs")
