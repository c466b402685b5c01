"""shadow bundles: a role per bundle (active, shadow, retired) and shadow results

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09

`bundle_roles` records, per bundle (name + version) and the manifest sha256 it was
recorded for, whether it is the modality's active bundle (its results are sent),
a shadow (scores the same studies, recorded only) or retired; at most one active
per modality (a partial unique index). No rows means what came before: every
configured bundle is active. Changes are audited in audit_events.
`shadow_results` holds what a shadow bundle made of a study, beside the active
result it shadowed; nothing in it is ever delivered.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bundle_roles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sa.String(length=64), nullable=False),
        sa.Column("bundle_version", sa.String(length=32), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("role", sa.Enum("active", "shadow", "retired", name="bundle_role", native_enum=False,
                                  create_constraint=True, length=16), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_roles")),
        sa.UniqueConstraint("bundle_name", "bundle_version", name=op.f("uq_bundle_roles_bundle_name_bundle_version")),
    )
    op.create_index("ix_bundle_roles_one_active", "bundle_roles", ["modality"], unique=True,
                    sqlite_where=sa.text("role = 'active'"), postgresql_where=sa.text("role = 'active'"))

    op.create_table(
        "shadow_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sa.String(length=64), nullable=False),
        sa.Column("bundle_version", sa.String(length=32), nullable=False),
        sa.Column("scoring_sha256", sa.String(length=64), nullable=True),
        sa.Column("eligible", sa.Boolean(), nullable=True),
        sa.Column("ineligible_reason", sa.Text(), nullable=True),
        sa.Column("anomaly_score", sa.Float(), nullable=True),
        sa.Column("percentile", sa.Float(), nullable=True),
        sa.Column("screen_positive", sa.Boolean(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("predicted_age", sa.Float(), nullable=True),
        sa.Column("chronological_age", sa.Float(), nullable=True),
        sa.Column("age_gap", sa.Float(), nullable=True),
        sa.Column("terms", sa.JSON(), nullable=False),
        sa.Column("qc_reasons", sa.JSON(), nullable=False),
        sa.Column("station_key", sa.String(length=200), nullable=True),
        sa.Column("reference_kind", sa.Enum("bundle", "site", "calibrating", name="reference_kind", native_enum=False,
                                            create_constraint=False, length=16), nullable=True),
        sa.Column("reference_id", sa.Integer(), nullable=True),
        sa.Column("shared_preprocessing", sa.Boolean(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_shadow_results_result_id_results")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_shadow_results_study_id_studies")),
        sa.ForeignKeyConstraint(["reference_id"], ["site_references.id"],
                                name=op.f("fk_shadow_results_reference_id_site_references")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_results")),
        sa.UniqueConstraint("result_id", "bundle_name", "bundle_version",
                            name=op.f("uq_shadow_results_result_id_bundle_name_bundle_version")),
    )
    op.create_index(op.f("ix_shadow_results_study_id"), "shadow_results", ["study_id"], unique=False)
    op.create_index("ix_shadow_results_bundle", "shadow_results", ["bundle_name", "bundle_version", "id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_shadow_results_bundle", table_name="shadow_results")
    op.drop_index(op.f("ix_shadow_results_study_id"), table_name="shadow_results")
    op.drop_table("shadow_results")
    op.drop_index("ix_bundle_roles_one_active", table_name="bundle_roles")
    op.drop_table("bundle_roles")
