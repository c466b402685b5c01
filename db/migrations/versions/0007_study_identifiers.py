"""study identifiers: accession number and patient ID of each study

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

The console identifies a study as a hospital does: accession number, patient ID and
study date beside the Study Instance UID, and finds it by them. The study date was
recorded already; the other two are filled from the first instance that has them, as
the study date is. Studies received before this revision have none (NULL). Patient
data: shown in the authenticated console only, never logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("accession_number", sa.String(length=64), nullable=True))
    op.add_column("studies", sa.Column("patient_id", sa.String(length=64), nullable=True))
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])


def downgrade() -> None:
    op.drop_index("ix_studies_patient_id", table_name="studies")
    op.drop_index("ix_studies_accession_number", table_name="studies")
    # Plain DROP COLUMN (SQLite 3.35+), as 0003 does: a batch copy of studies would trip
    # the foreign keys that point at it.
    op.drop_column("studies", "patient_id")
    op.drop_column("studies", "accession_number")
