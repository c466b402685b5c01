"""Shared fixtures: a fresh, migrated database per test on SQLite and on PostgreSQL.

PostgreSQL is expected at 127.0.0.1:5432 (user postgres, trust auth; `make` starts
it). Override with HEADSCREEN_TEST_PG_ADMIN_URL (a URL of a database used only to
CREATE/DROP the per-test databases). Unreachable PostgreSQL fails the test, loudly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory
from db.migrate import upgrade

PG_ADMIN_URL = os.environ.get(
    "HEADSCREEN_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
DB_BACKENDS = ["sqlite", "postgresql"]


def _pg_admin() -> psycopg.Connection:
    url = make_url(PG_ADMIN_URL)
    try:
        return psycopg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database or "postgres",
            autocommit=True,
            connect_timeout=5,
        )
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {url.render_as_string(hide_password=True)} ({exc}). "
            "Start it (the Makefile's test target does) or set HEADSCREEN_TEST_PG_ADMIN_URL.",
            pytrace=False,
        )


def create_pg_database(template: str | None = None) -> tuple[str, str]:
    """Create a uniquely named PostgreSQL database (empty, or a copy of `template`);
    returns (name, url)."""
    name = f"hs_test_{uuid.uuid4().hex[:16]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    return name, url.render_as_string(hide_password=False)


def drop_pg_database(name: str) -> None:
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_migrated_template() -> Iterator[str]:
    """A PostgreSQL database migrated once per test session; per-test databases copy it
    (CREATE DATABASE ... TEMPLATE), which is several times faster than migrating each."""
    name, url = create_pg_database()
    try:
        upgrade(url)
        yield name
    finally:
        drop_pg_database(name)


@pytest.fixture(params=DB_BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema: a temp SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
        return
    name, url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database migrated to head, on SQLite and on PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
        upgrade(url)
        yield url
        return
    name, url = create_pg_database(template=request.getfixturevalue("pg_migrated_template"))
    try:
        upgrade(url)  # a no-op on the migrated copy; proves the revision is head
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_sessions(db_engine: Engine) -> sessionmaker[Session]:
    """The session factory; use one session per thread in concurrency tests."""
    return session_factory(db_engine)


@pytest.fixture
def db_session(db_sessions: sessionmaker[Session]) -> Iterator[Session]:
    with db_sessions() as session:
        yield session
