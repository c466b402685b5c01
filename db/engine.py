"""Engines and sessions for SQLite (single host) and PostgreSQL (many hosts).

SQLite write transactions start with BEGIN IMMEDIATE: a deferred transaction that
reads and then writes can fail at once with SQLITE_BUSY instead of waiting, so
`db.api` marks its write transactions with the WRITE_TX option (see `begin_write`).

A write transaction may be marked relaxed (RELAXED_COMMIT): its commit does not wait
for the disk (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off). Only the
receiver uses that, for rows whose durable copy is already in its ingest journal
(daemon/ingest_journal.py); every other transaction stays synchronous.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from headscreen.errors import TransientError

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITE_TX = "headscreen_write_tx"
RELAXED_COMMIT = "headscreen_relaxed_commit"
WAL_RETRY_S = 0.02
# libpq: a connection whose peer went silent (a network cut, a host gone, no RST) fails in
# about 20 s instead of hanging for the kernel's ~15 min of retransmissions, so a worker on
# another machine notices, waits and claims again (daemon/worker.py); connecting gives up at 10 s.
PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                   "keepalives_count": 3, "tcp_user_timeout": 20_000}


def normalise_url(url: str | URL) -> URL:
    """Plain `postgresql://` and `postgres://` URLs use psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, application_name: str | None = None, **kwargs: Any) -> Engine:
    """`application_name` (PostgreSQL): what pg_stat_activity shows for this process's
    connections, so a database admin sees which role holds them (docs/deployment.md)."""
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    if backend == "postgresql":
        connect_args = {**PG_CONNECT_ARGS, **kwargs.pop("connect_args", {})}
        if application_name:
            connect_args["application_name"] = application_name[:63]  # PostgreSQL's NAMEDATALEN - 1
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        _ping_when_idle(engine)
        return engine
    raise ValueError(f"url: unsupported database backend {backend!r} (use sqlite or postgresql)")


# A pooled PostgreSQL connection is pinged before use only when it has been idle this long
# (a server restart, an idle timeout or a firewall cut it meanwhile). pool_pre_ping pinged
# at every checkout: a round trip per received instance. A connection lost within the
# last second fails its next statement instead (`connection_invalidated`): the receiver
# retries it on another, a worker waits and claims again, elsewhere that call fails once.
PING_WHEN_IDLE_S = 1.0
_CHECKED_IN_AT = "headscreen_checked_in_at"


def _ping_when_idle(engine: Engine) -> None:
    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKED_IN_AT] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is not None and time.monotonic() - checked_in_at < PING_WHEN_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            # The pool discards it and checks out another: SQLAlchemy's pessimistic
            # disconnect handling, as pool_pre_ping does.
            raise DisconnectionError("a pooled connection did not answer a ping")

    event.listen(engine, "connect", checked_in)
    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


def _sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN is turned off so `_sqlite_on_begin` decides the kind.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _ensure_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: an instance is acknowledged to the sender only after a durable commit.
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _ensure_wal(cursor: Any) -> None:
    """Switch a new database file to WAL (persistent in the file).

    The switch needs an exclusive lock and SQLite reports "database is locked" at
    once, without its busy handler, when several processes open a fresh file
    together; so it is retried until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            mode = "locked"
        if mode in ("wal", "memory"):
            return
        if time.monotonic() > deadline:
            raise TransientError(f"could not switch the SQLite database to WAL (journal mode {mode})")
        time.sleep(WAL_RETRY_S)


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    _sqlite_begin(conn.exec_driver_sql, conn.info, write=options.get(WRITE_TX, False),
                  relaxed=options.get(RELAXED_COMMIT, False))


def _sqlite_begin(execute: Callable[[str], object], info: dict[Any, Any], *, write: bool, relaxed: bool) -> None:
    # The synchronous level is per connection, so it is set before each transaction that
    # needs the other level; `info` is the pooled connection's, shared by both callers.
    synchronous = "NORMAL" if relaxed else "FULL"
    if info.get("synchronous", "FULL") != synchronous:
        execute(f"PRAGMA synchronous={synchronous}")
        info["synchronous"] = synchronous
    execute("BEGIN IMMEDIATE" if write else "BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after the api functions commit.
    return sessionmaker(bind=engine, expire_on_commit=False)


def begin_write(session: Session, *, relaxed: bool = False) -> None:
    """Start the session's write transaction (IMMEDIATE on SQLite); `relaxed`: its
    commit does not wait for the disk (see the module docstring).

    A transaction the caller left open is committed first: every `db.api` function
    owns its own transaction.
    """
    if session.in_transaction():
        session.commit()
    connection = session.connection(execution_options={WRITE_TX: True, RELAXED_COMMIT: relaxed})
    if relaxed and connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def begin_driver_write(dialect_name: str, connection: PoolProxiedConnection, *, relaxed: bool = False) -> None:
    """`begin_write` on a pooled DB-API connection used below SQLAlchemy's execution layer
    (db.driver_sql): the same transaction kind and commit durability."""
    cursor = connection.cursor()
    try:
        if dialect_name == "sqlite":
            _sqlite_begin(cursor.execute, connection.info, write=True, relaxed=relaxed)
        elif relaxed:  # psycopg opens the transaction with this statement
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
    finally:
        cursor.close()


def is_postgres(session: Session) -> bool:
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"


@contextmanager
def write_transaction(session: Session, *, relaxed: bool = False) -> Iterator[None]:
    """`begin_write`, then commit on success or roll back on any error."""
    begin_write(session, relaxed=relaxed)
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise
