"""A pooled PostgreSQL connection is pinged before use only after it sat idle (db.engine).

pool_pre_ping cost a round trip at every checkout, one per received instance. A
connection idle past PING_WHEN_IDLE_S is still pinged and replaced when the server
dropped it; one lost within that time fails its statement once, marked
`connection_invalidated`, and the receiver's retry records the instance on another.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from conftest import _pg_admin, create_pg_database, drop_pg_database
from headscreen.daemon import receiver
from headscreen.db import engine as db_engine
from headscreen.db.engine import make_engine


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    name, url = create_pg_database()
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        drop_pg_database(name)


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pid: int) -> None:
    with _pg_admin() as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_a_connection_idle_past_the_limit_is_pinged_and_replaced(pg_engine, monkeypatch):
    lost = _backend_pid(pg_engine)
    _terminate(lost)
    monkeypatch.setattr(db_engine, "PING_WHEN_IDLE_S", 0.0)

    assert _backend_pid(pg_engine) != lost  # no error: the ping found it gone


def test_a_connection_lost_a_moment_ago_fails_once_and_the_receiver_retries(pg_engine, monkeypatch):
    pings = []
    monkeypatch.setattr(pg_engine.dialect, "do_ping", lambda connection: pings.append(connection) or True)
    monkeypatch.setattr(db_engine, "PING_WHEN_IDLE_S", 3600.0)
    lost = _backend_pid(pg_engine)
    assert _backend_pid(pg_engine) == lost and pings == []  # used again at once, not pinged
    _terminate(lost)

    with pytest.raises(OperationalError) as failed:
        _backend_pid(pg_engine)

    assert failed.value.connection_invalidated
    assert receiver._is_retryable(failed.value)
    assert _backend_pid(pg_engine) != lost  # the retry's connection is a new one
