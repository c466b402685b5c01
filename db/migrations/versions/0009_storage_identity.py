"""storage identity: the UUID of the storage root, checked by every worker at start

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

`serve` writes a UUID to `<storage_dir>/.headscreen-storage-id` once and records it
here (one row). A worker on another machine compares its storage_dir's marker with
this row before it takes a job: a local folder where the shared mount should be (no
marker) or another deployment's storage (another UUID) is refused, instead of every
job reading "no images" from the wrong disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "storage_identity",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("storage_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_identity")),
    )


def downgrade() -> None:
    op.drop_table("storage_identity")
