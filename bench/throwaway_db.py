"""A throw-away PostgreSQL database for the benchmarks (a module they import, not one to run)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def throwaway_postgres(admin_url: str, prefix: str) -> Iterator[str]:
    """A new database `<prefix>_<pid>_<ns>` next to the admin one, dropped on exit; yields its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"{prefix}_{os.getpid()}_{time.monotonic_ns()}"
    connect = dict(host=admin.host, port=admin.port or 5432, user=admin.username,
                   password=admin.password, dbname=admin.database or "postgres", autocommit=True)
    with psycopg.connect(**connect) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**connect) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
