"""Alembic environment: the URL comes from `config.attributes["url"]` (see db.migrate).

Several processes may upgrade one database at start-up; they take turns: an
advisory lock on PostgreSQL, one BEGIN IMMEDIATE transaction around everything on
SQLite (whose DDL is transactional). The later ones then find the head applied.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from headscreen.db.engine import WRITE_TX, make_engine
from headscreen.db.models import Base

# Any constant: the advisory lock id that serialises concurrent PostgreSQL upgrades.
PG_MIGRATION_LOCK_ID = 0x6865_6164  # "head"

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.attributes["url"], target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection, render_as_batch: bool) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=render_as_batch,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate_postgres(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": PG_MIGRATION_LOCK_ID})
    connection.commit()
    try:
        _migrate(connection, render_as_batch=False)
        connection.commit()
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": PG_MIGRATION_LOCK_ID})
        connection.commit()


def _migrate_sqlite(connection: Connection) -> None:
    connection.execution_options(**{WRITE_TX: True})
    with connection.begin():
        _migrate(connection, render_as_batch=True)


def run_migrations_online() -> None:
    engine = make_engine(config.attributes["url"])
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                _migrate_postgres(connection)
            else:
                _migrate_sqlite(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
