"""site calibration: per-scanner healthy references; station and reference on results

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

`site_references` holds healthy reference distributions and thresholds estimated
from this site's own studies (per bundle manifest and scanner group), with their
provenance; they are retired, never deleted. Each result records the scanner it
came from, the manifest that scored it and the reference that judged it. Columns
are added in place (no table copy on SQLite, whose DROP TABLE would trip the
foreign keys of result_objects); results stored before this revision have no
station and join a calibration only when run again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "site_references",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sa.String(length=64), nullable=False),
        sa.Column("bundle_version", sa.String(length=32), nullable=False),
        sa.Column("scoring_sha256", sa.String(length=64), nullable=False),
        sa.Column("grouping", sa.String(length=16), nullable=False),
        sa.Column("station", sa.String(length=200), nullable=False),
        sa.Column("rule", sa.String(length=32), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("specificity", sa.Float(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("result_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_by", sa.String(length=64), nullable=True),
        sa.Column("retire_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site_references")),
    )
    op.create_index("ix_site_references_lookup", "site_references",
                    ["bundle_name", "bundle_version", "station", "id"], unique=False)

    op.add_column("results", sa.Column("station_key", sa.String(length=200), nullable=True))
    op.add_column("results", sa.Column("scoring_sha256", sa.String(length=64), nullable=True))
    op.add_column("results", sa.Column(
        "reference_kind",
        sa.Enum("bundle", "site", "calibrating", name="reference_kind", native_enum=False, create_constraint=False,
                length=16),
        nullable=True,
    ))
    if op.get_bind().dialect.name == "sqlite":
        # An inline REFERENCES is the one way SQLite adds a foreign key to an existing table.
        op.execute("ALTER TABLE results ADD COLUMN reference_id INTEGER "
                   "CONSTRAINT fk_results_reference_id_site_references REFERENCES site_references (id)")
    else:
        op.add_column("results", sa.Column(
            "reference_id", sa.Integer(),
            sa.ForeignKey("site_references.id", name=op.f("fk_results_reference_id_site_references")),
            nullable=True,
        ))
    op.create_index("ix_results_station", "results", ["bundle_name", "bundle_version", "station_key", "id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_results_station", table_name="results")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite drops a column with its inline foreign key (3.35+); no table copy.
        op.execute("ALTER TABLE results DROP COLUMN reference_id")
    else:
        op.drop_constraint(op.f("fk_results_reference_id_site_references"), "results", type_="foreignkey")
        op.drop_column("results", "reference_id")
    op.drop_column("results", "reference_kind")
    op.drop_column("results", "scoring_sha256")
    op.drop_column("results", "station_key")
    op.drop_index("ix_site_references_lookup", table_name="site_references")
    op.drop_table("site_references")
