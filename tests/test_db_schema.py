"""Migrations, engine settings and column types, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db_factories import T0, add_series, uid
from headscreen.db import api
from headscreen.db.engine import make_engine
from headscreen.db.migrate import current_revision, head_revision, upgrade
from headscreen.db.models import AuditEvent, Base
from headscreen.db.states import StudyState


def test_empty_database_migrates_to_the_models_schema(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    upgrade(empty_db_url)  # a second upgrade is a no-op
    assert current_revision(empty_db_url) == head_revision() == "0012"
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_sqlite_engine_settings(tmp_path) -> None:
    path = tmp_path / "nested" / "dir" / "hs.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
    finally:
        engine.dispose()
    assert path.parent.is_dir()
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 2}


def test_plain_postgresql_url_uses_psycopg() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:5432/test")
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_each_role_names_its_connections_and_drops_dead_ones_quickly(db_url: str) -> None:
    """PostgreSQL: pg_stat_activity shows which headscreen process holds a connection, and a
    connection whose peer went silent fails in seconds (keepalives, tcp_user_timeout); SQLite
    takes the same call."""
    engine = make_engine(db_url, application_name="headscreen worker 3")
    try:
        with engine.connect() as connection:
            if engine.dialect.name != "postgresql":
                assert connection.execute(text("SELECT 1")).scalar_one() == 1
                return
            assert connection.execute(text("SHOW application_name")).scalar_one() == "headscreen worker 3"
            # libpq's own options (the client's socket): SHOW would give the server's.
            params = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert (params["tcp_user_timeout"], params["keepalives_idle"], params["keepalives"]) == ("20000", "10", "1")
    finally:
        engine.dispose()


def test_unsupported_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="url"):
        make_engine("mysql://localhost/x")


def test_timestamps_come_back_timezone_aware_utc(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 2)
    detail = api.get_study(db_session, study)
    assert detail is not None
    assert detail.row.first_received_at == T0
    assert detail.row.first_received_at.utcoffset() is not None


def test_naive_datetimes_are_refused(db_session: Session) -> None:
    with pytest.raises(ValueError, match="now"):
        api.audit(db_session, "admin", "x", now=datetime(2026, 1, 1))
    db_session.add(AuditEvent(at=datetime(2026, 1, 1), actor="a", action="b", detail={}))
    with pytest.raises(Exception, match="timezone-aware"):
        db_session.flush()
    db_session.rollback()


def test_state_check_constraint_rejects_unknown_values(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 1)
    with pytest.raises(IntegrityError):
        db_session.execute(text("UPDATE studies SET state = 'bogus'"))
        db_session.commit()
    db_session.rollback()
    assert api.list_studies(db_session)[0].state == StudyState.RECEIVING


def test_foreign_keys_are_enforced(db_session: Session) -> None:
    with pytest.raises(IntegrityError):
        api.audit(db_session, "admin", "orphan", study_id=987654)
    db_session.rollback()


def test_downgrade_to_base_and_up_again(empty_db_url: str) -> None:
    from alembic import command

    from headscreen.db.migrate import alembic_config

    upgrade(empty_db_url)
    command.downgrade(alembic_config(empty_db_url), "base")
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()


def test_logs_carry_no_patient_data(db_session: Session, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    study = uid()
    series = add_series(db_session, study, 3, patient_birth_date="19710203", patient_age="054Y")
    api.sweep_completeness(db_session, T0.replace(hour=12), 60, 10, [])
    from db_factories import record

    api.record_instance(db_session, record(study, series, 9, 45.0, patient_birth_date="19710203"),
                        now=T0.replace(hour=13))
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "study_reopened" in logged  # something was logged
    assert "19710203" not in logged and "054Y" not in logged
