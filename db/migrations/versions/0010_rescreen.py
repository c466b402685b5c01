"""archive re-screening: job priorities, rescreen runs and their studies

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

`headscreen rescreen` queries a PACS for a date range and retrieves each study into
the same queue as live studies, behind them: jobs get a priority (lower is claimed
first; live 0, re-screening 100) and the claim orders by priority, then age. A run
(`rescreen_runs`: its query, rate and whether results are delivered) and each study it
found (`rescreen_items`, with its state) are kept, so a stopped run resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _state(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "rescreen_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("since", sa.String(length=8), nullable=False),
        sa.Column("until", sa.String(length=8), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("record_only", sa.Boolean(), nullable=False),
        sa.Column("per_hour", sa.Float(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=False),
        sa.Column("state", _state("rescreen_run_state", "running", "stopped", "finished"), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rescreen_runs")),
    )
    op.create_table(
        "rescreen_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modalities", sa.String(length=64), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("state", _state("rescreen_item_state", "pending", "retrieving", "queued", "done", "skipped",
                                  "failed"), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["rescreen_runs.id"], name=op.f("fk_rescreen_items_run_id_rescreen_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rescreen_items")),
        sa.UniqueConstraint("run_id", "study_instance_uid",
                            name=op.f("uq_rescreen_items_run_id_study_instance_uid")),
    )
    op.create_index("ix_rescreen_items_study", "rescreen_items", ["study_instance_uid", "state"])
    op.create_index("ix_rescreen_items_run_state", "rescreen_items", ["run_id", "state"])

    op.add_column("jobs", sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False))
    if op.get_bind().dialect.name == "sqlite":
        # An inline REFERENCES is the one way SQLite adds a foreign key to an existing table.
        op.execute("ALTER TABLE jobs ADD COLUMN rescreen_run_id INTEGER "
                   "CONSTRAINT fk_jobs_rescreen_run_id_rescreen_runs REFERENCES rescreen_runs (id)")
    else:
        op.add_column("jobs", sa.Column(
            "rescreen_run_id", sa.Integer(),
            sa.ForeignKey("rescreen_runs.id", name=op.f("fk_jobs_rescreen_run_id_rescreen_runs")), nullable=True))
    # The claim orders by priority, then age: the index follows.
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", ["state", "priority", "available_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", ["state", "available_at"])
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE jobs DROP COLUMN rescreen_run_id")
    else:
        op.drop_constraint(op.f("fk_jobs_rescreen_run_id_rescreen_runs"), "jobs", type_="foreignkey")
        op.drop_column("jobs", "rescreen_run_id")
    op.drop_column("jobs", "priority")
    op.drop_index("ix_rescreen_items_run_state", table_name="rescreen_items")
    op.drop_index("ix_rescreen_items_study", table_name="rescreen_items")
    op.drop_table("rescreen_items")
    op.drop_table("rescreen_runs")
