"""parametric maps: result objects of kind 'pm' (DICOM Parametric Map of the anomaly map)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20

With `parametric_map_enabled` a result carries the anomaly map as a Parametric Map, one
more result object delivered like the others. The only schema change: the CHECK
constraint on result_objects.kind admits 'pm'. Widened as 0005 widened it (on SQLite
the table's SQL in sqlite_master is edited in place; 0005 says why); the helpers are
copied, not imported, so that this revision stays as it was when a later one changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_result_objects_object_kind"
_OLD = "kind IN ('sc', 'sr', 'seg', 'kos')"
_NEW = "kind IN ('sc', 'sr', 'seg', 'pm', 'kos')"


def _sqlite_replace_check(old: str, new: str) -> None:
    bind = op.get_bind()
    sql = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'result_objects'").scalar_one()
    if new in sql:
        return
    if sql.count(old) != 1:
        raise RuntimeError(f"result_objects: the CHECK constraint {_NAME} is not the expected one")
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        bind.exec_driver_sql(
            "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'result_objects'",
            (sql.replace(old, new),))
        # Other connections re-read the schema when its version changes.
        bind.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = bind.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"result_objects: integrity check failed after the CHECK change: {problems[:3]}")


def _replace_check(old: str, new: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_replace_check(old, new)
    else:
        op.drop_constraint(op.f(_NAME), "result_objects", type_="check")
        op.create_check_constraint(op.f(_NAME), "result_objects", sa.text(new))


def upgrade() -> None:
    _replace_check(_OLD, _NEW)


def downgrade() -> None:
    # Parametric maps cannot exist before this revision: their records go (the files stay).
    op.execute("DELETE FROM deliveries WHERE result_object_id IN "
               "(SELECT id FROM result_objects WHERE kind = 'pm')")
    op.execute("DELETE FROM result_objects WHERE kind = 'pm'")
    _replace_check(_NEW, _OLD)
