"""results age_offset: a scanner's brain-age correction from its site reference

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

A site reference (`headscreen calibrate`) may hold a scanner's brain-age bias, the
median gap of its confirmed-normal studies; a result judged against it reports its
brain age less that offset, and keeps the offset so the model's own estimate can be
recovered (the next calibration estimates from it). Earlier results have none (NULL):
no correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("results", "shadow_results")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("age_offset", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), as 0007 does.
    for table in TABLES:
        op.drop_column(table, "age_offset")
