"""study released_at: when an association that sent the study last ended in an A-RELEASE

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

A study whose content is whole counts as complete after `whole_quiet_s` of quiet. When
every association that sent it has ended in an orderly release (none is still open with
more to send), `released_quiet_s` of quiet is enough: the receiver stamps the studies an
association stored when it is released, and the completeness sweep compares that stamp
with the study's last instance (db.sweep). Studies received before this revision have
none (NULL) and wait as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), as 0007 does.
    op.drop_column("studies", "released_at")
