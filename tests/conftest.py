"""Shared fixtures: a fresh, migrated database per test on SQLite and on PostgreSQL.

PostgreSQL is expected at 127.0.0.1:5432 (user postgres, trust auth; `make` starts
it). Override with HEADSCREEN_TEST_PG_ADMIN_URL (a URL of a database used only to
CREATE/DROP the per-test databases). Unreachable PostgreSQL fails the test, loudly.

Under pytest-xdist (`make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`):
each worker is its own process with its own tmp_path root, its own migrated template
database and its own database names (see `worker_tag`); ports are taken free at run
time (daemon.orthanc.free_port, or port 0). Each test module is one unit of work, so
module fixtures are built once and a module's tests run in order on one worker;
modules are handed out slowest first (SLOWEST_FIRST) so both workers finish at about
the same time. Not `--dist loadgroup`: with pytest 9.2 and pytest-xdist 3.8 it
silently ignores xdist_group marks (pytest-dev/pytest-xdist#1386), so no test relies
on them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade

# The console fixtures (`console`, `console_any_db`) live in tests/web_helpers.py; a test
# names them as arguments without importing them (an import would shadow them: F811).
pytest_plugins = ["web_helpers"]

PG_ADMIN_URL = os.environ.get(
    "HEADSCREEN_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# The PostgreSQL cases carry the `postgres` mark: `make test-fast` runs SQLite only
# (-m "not slow and not postgres"), `make test` both.
DB_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]

# Test modules in descending time: the sum of their tests' times in a `make test` run with
# two workers on the quiet 2-core machine (2026-12-03: 1830 s in all, 15 min 34 s of wall
# time, CPU 89 % busy). pytest-xdist hands modules out in collection order (with
# --no-loadscope-reorder; its default is "most tests first"): with the longest units first
# the short ones fill in at the end (longest-processing-time first). A module not listed
# keeps its place after these; a stale list only costs balance, never correctness.
SLOWEST_FIRST = [
    "test_delivery_e2e.py",  # 188 s
    "test_e2e.py",  # 186 s
    "test_multi_machine.py",  # 161 s
    "test_rescreen_e2e.py",  # 100 s
    "test_container.py",  # 95 s
    "test_viewer_ohif.py",  # 87 s
    "test_imaging.py",  # 81 s
    "test_dataset.py",  # 71 s
    "test_real_scans.py",  # 65 s
    "test_site_calibration.py",  # 62 s
    "test_train_floor.py",  # 45 s
    "test_deploy.py",  # 38 s
    "test_evaluate.py",  # 35 s
    "test_web_api.py",  # 33 s
    "test_pipeline.py",  # 31 s
    "test_privacy.py",  # 28 s
    "test_training_fit.py",  # 27 s
    "test_anomalies.py",  # 26 s
    "test_receiver_bad_headers.py",  # 26 s
    "test_receiver_hardening.py",  # 23 s
    "test_ingest_journal.py",  # 23 s
    "test_receiver.py",  # 22 s
    "test_sr_conformance.py",  # 22 s
    "test_pm.py",  # 20 s
    "test_iocm.py",  # 20 s
    "test_db_concurrency.py",  # 20 s
    "test_operations.py",  # 19 s
    "test_fuzz_input.py",  # 17 s
    "test_reference.py",  # 16 s
    "test_synthesis.py",  # 16 s
]


def worker_tag() -> str:
    """'gw0', 'gw1', ... under pytest-xdist; 'main' in a plain pytest run."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slowest modules first (the order inside a module, and of the
    modules not listed, stays: sorted() is stable). A plain pytest run keeps file order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
        items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


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
    name = f"hs_test_{worker_tag()}_{uuid.uuid4().hex[:16]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    return name, url.render_as_string(hide_password=False)


def drop_pg_database(name: str) -> None:
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The module that checks our own associations have the handler runs without this fixture.
_CHECKS_THE_HANDLER = "test_requestor_responses"


@pytest.fixture(autouse=True)
def _test_senders_take_every_response(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own pynetdicom senders stand in for a PACS, and pynetdicom's association
    thread can take their responses on a busy machine (export/delivery.py::
    caller_takes_every_message): a test would then wait out its DIMSE timeout and fail for
    no fault of the receiver. They get the handler our own associations have."""
    if request.module.__name__.rpartition(".")[2] == _CHECKS_THE_HANDLER:
        return
    from pynetdicom import AE, evt

    from headscreen.export.delivery import caller_takes_every_message

    associate = AE.associate

    def with_the_handler(self: AE, *args: Any, evt_handlers: list[Any] | None = None, **kwargs: Any) -> Any:
        handlers = list(evt_handlers or [])
        if not any(handler[1] is caller_takes_every_message for handler in handlers):
            handlers.append((evt.EVT_CONN_OPEN, caller_takes_every_message))
        return associate(self, *args, evt_handlers=handlers, **kwargs)

    monkeypatch.setattr(AE, "associate", with_the_handler)


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
