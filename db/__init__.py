"""headscreen persistence: SQLAlchemy 2.0 models (db.models), Alembic migrations (db.migrate)
and the only functions that change state, all reached through one facade: `db.api`."""
