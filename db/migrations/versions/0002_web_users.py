"""web console users and sessions; study-list indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Users and DB-stored login sessions for the admin console, and the indexes that
keep its study list fast at 100,000 studies (sorted by arrival, filtered by
station or modality; the current result of a study found by index).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("role", sa.Enum("viewer", "admin", name="user_role", native_enum=False, create_constraint=True, length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_web_sessions_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_web_sessions_token_hash")),
    )
    op.create_index(op.f("ix_web_sessions_user_id"), "web_sessions", ["user_id"], unique=False)
    op.create_index(op.f("ix_web_sessions_expires_at"), "web_sessions", ["expires_at"], unique=False)

    op.create_index("ix_studies_last_received", "studies", ["last_received_at", "id"], unique=False)
    op.create_index("ix_studies_first_received", "studies", ["first_received_at", "id"], unique=False)
    op.create_index("ix_studies_station", "studies", ["station_name", "last_received_at"], unique=False)
    op.create_index("ix_studies_modality", "studies", ["modality", "last_received_at"], unique=False)
    op.create_index("ix_results_current", "results", ["study_id", "superseded", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_results_current", table_name="results")
    op.drop_index("ix_studies_modality", table_name="studies")
    op.drop_index("ix_studies_station", table_name="studies")
    op.drop_index("ix_studies_first_received", table_name="studies")
    op.drop_index("ix_studies_last_received", table_name="studies")
    op.drop_index(op.f("ix_web_sessions_expires_at"), table_name="web_sessions")
    op.drop_index(op.f("ix_web_sessions_user_id"), table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_table("users")
