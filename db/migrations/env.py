"""Alembic environment: the URL comes from `config.attributes["url"]` (see db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from db.engine import WRITE_TX, make_engine
from db.models import Base

# Any constant: serialises concurrent upgrades of one PostgreSQL database.
PG_MIGRATION_LOCK_ID = 0x6865_6164  # "head"

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.attributes["url"], target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(config.attributes["url"])
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": PG_MIGRATION_LOCK_ID})
                connection.commit()
            else:
                # BEGIN IMMEDIATE: two processes upgrading one SQLite file take turns.
                connection.execution_options(**{WRITE_TX: True})
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=not postgres,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": PG_MIGRATION_LOCK_ID})
                connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
