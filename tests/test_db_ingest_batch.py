"""record_instances (one transaction for many instances) and the lean record_instance
path, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from conftest import create_pg_database, drop_pg_database
from db_factories import BUNDLES, T0, add_series, at, record, uid
from headscreen.db import api, ingest
from headscreen.db.driver_sql import DriverStatement
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import AuditEvent, Instance, Series, Study
from headscreen.db.states import StudyState
from headscreen.db.types import InstanceRecord


@contextmanager
def counted_statements(session: Session, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """SQL statements sent while the block runs: through the session's engine, and on the
    DB-API cursor by the driver path (db.driver_sql)."""
    engine = session.get_bind()
    sent: list[str] = []

    def note(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement.split()[0].upper())

    driver_execute = DriverStatement.execute

    def note_driver(self: DriverStatement, cursor: Any, values: Any) -> Any:
        sent.append(self.sql.split()[0].upper())
        return driver_execute(self, cursor, values)

    event.listen(engine, "before_cursor_execute", note)
    with monkeypatch.context() as patch:
        patch.setattr(DriverStatement, "execute", note_driver)
        try:
            yield sent
        finally:
            event.remove(engine, "before_cursor_execute", note)


def snapshot(session: Session) -> dict[str, object]:
    """Everything record_instance(s) can change, keyed by UIDs (ids differ between databases)."""
    session.commit()
    studies = session.execute(
        select(Study.study_instance_uid, Study.state, Study.generation, Study.modality, Study.last_received_at,
               Study.study_date, Study.patient_age, Study.station_name, Study.institution)
        .order_by(Study.study_instance_uid)
    ).all()
    series = session.execute(
        select(Series.series_instance_uid, Series.instance_count).order_by(Series.series_instance_uid)
    ).all()
    instances = session.execute(
        select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes, Instance.generation)
        .order_by(Instance.sop_instance_uid)
    ).all()
    audits = session.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    return {"studies": studies, "series": series, "instances": instances, "audits": audits}


def test_batch_creates_rows_for_several_studies_and_series(db_session: Session) -> None:
    study_a, study_b, series_a1, series_a2, series_b = uid(), uid(), uid(), uid(), uid()
    records = [record(study_a, series_a1, 1, 1.0), record(study_b, series_b, 1, 1.0),
               record(study_a, series_a2, 1, 1.0), record(study_a, series_a1, 2, 2.0)]
    outcomes = api.record_instances(db_session, records, now=T0)
    assert [o.created for o in outcomes] == [True] * 4
    assert outcomes[0].study_id == outcomes[2].study_id == outcomes[3].study_id != outcomes[1].study_id
    counts = dict(db_session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
    assert counts == {series_a1: 2, series_a2: 1, series_b: 1}
    assert db_session.execute(select(func.count()).select_from(Instance)).scalar_one() == 4


def test_duplicate_inside_one_batch_is_recorded_once(db_session: Session) -> None:
    study, series = uid(), uid()
    first = record(study, series, 1, 1.0)
    moved = record(study, series, 1, 1.0, sop=first.sop_instance_uid, path="moved.dcm", size_bytes=7)
    outcomes = api.record_instances(db_session, [first, moved], now=T0)
    assert [o.created for o in outcomes] == [True, False]
    instance = db_session.execute(select(Instance)).scalar_one()
    assert (instance.path, instance.size_bytes) == ("moved.dcm", 7)
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 1


def test_batch_reopens_a_complete_study_once(db_session: Session) -> None:
    study = uid()
    series = add_series(db_session, study, 3)
    api.sweep_completeness(db_session, at(600), 300, 30, BUNDLES)
    late = [record(study, series, 4, 20.0), record(study, series, 5, 25.0)]
    outcomes = api.record_instances(db_session, late, now=at(900))
    assert [o.study_reopened for o in outcomes] == [True, False]
    row = db_session.execute(select(Study)).scalar_one()
    assert (row.state, row.generation, row.completed_at, row.last_received_at) == (
        StudyState.RECEIVING, 2, None, at(900))
    generations = db_session.execute(select(Instance.generation).order_by(Instance.id)).scalars().all()
    assert generations == [1, 1, 1, 2, 2]
    reopen_audits = db_session.execute(
        select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "study_reopened")
    ).scalar_one()
    assert reopen_audits == 1


def test_study_details_fill_from_the_first_instance_that_has_them(db_session: Session) -> None:
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, modality="OT", patient_age=None,
                                           station_name=None), now=T0)
    later = [record(study, series, 2, modality="CT", patient_age="061Y", station_name=None),
             record(study, series, 3, modality="MR", patient_age="099Y", station_name="CT01")]
    api.record_instances(db_session, later, now=at(1))
    row = db_session.execute(select(Study)).scalar_one()
    assert (row.modality, row.patient_age, row.station_name) == ("CT", "061Y", "CT01")


def test_a_failing_row_commits_nothing_of_its_batch(db_session: Session) -> None:
    study, series = uid(), uid()
    good = record(study, series, 1, 1.0)
    bad = record(study, series, 2, 2.0, sop_class_uid=None)  # NOT NULL
    with pytest.raises(IntegrityError):
        api.record_instances(db_session, [good, bad], now=T0)
    assert db_session.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
    assert db_session.execute(select(func.count()).select_from(Study)).scalar_one() == 0
    # The session is usable again and the good row goes in on its own.
    assert api.record_instance(db_session, good, now=T0).created


def random_arrivals(seed: int) -> list[InstanceRecord]:
    """Instances of a few studies, shuffled, with duplicates and sparse study details."""
    rng = random.Random(seed)
    records: list[InstanceRecord] = []
    for _ in range(3):
        study = uid()
        for _ in range(2):
            series = uid()
            for n in range(1, 7):
                records.append(record(study, series, n, float(n), modality=rng.choice(["CT", "OT", None]),
                                      patient_age=rng.choice([None, "050Y", "051Y"]),
                                      station_name=rng.choice([None, "ST1", "ST2"])))
    records += [record(r.study_instance_uid, r.series_instance_uid, r.instance_number,
                       sop=r.sop_instance_uid, path="resent.dcm", size_bytes=5) for r in rng.sample(records, 6)]
    rng.shuffle(records)
    return records


@pytest.fixture
def twin_sessions(db_sessions: sessionmaker[Session], tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    """A second fresh database on the same backend as `db_sessions`."""
    if db_sessions.kw["bind"].dialect.name == "sqlite":
        url, name = f"sqlite:///{tmp_path / 'twin.sqlite'}", None
        upgrade(url)
    else:
        name, url = create_pg_database(template=request.getfixturevalue("pg_migrated_template"))
    engine = make_engine(url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()
        if name is not None:
            drop_pg_database(name)


def test_batches_give_the_same_database_as_one_by_one(db_sessions: sessionmaker[Session],
                                                      twin_sessions: sessionmaker[Session]) -> None:
    records = random_arrivals(seed=7)
    # The first half's study completes before the second half: batches cross a reopen.
    first, rest = records[: len(records) // 2], records[len(records) // 2:]
    with db_sessions() as one_by_one:
        singles = [api.record_instance(one_by_one, r, now=T0) for r in first]
        api.sweep_completeness(one_by_one, at(3600), 60, 10, BUNDLES)
        singles += [api.record_instance(one_by_one, r, now=at(4000)) for r in rest]
        expected = snapshot(one_by_one)
    with twin_sessions() as batched:
        outcomes = []
        for start in range(0, len(first), 5):
            outcomes += api.record_instances(batched, first[start:start + 5], now=T0)
        api.sweep_completeness(batched, at(3600), 60, 10, BUNDLES)
        for start in range(0, len(rest), 5):
            outcomes += api.record_instances(batched, rest[start:start + 5], now=at(4000))
        assert snapshot(batched) == expected
    assert [(o.created, o.study_reopened) for o in outcomes] == [(o.created, o.study_reopened) for o in singles]
    assert any(o.study_reopened for o in outcomes)


def test_known_study_and_series_take_four_statements_or_one_on_postgresql(
        db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, 1.0), now=T0)
    with counted_statements(db_session, monkeypatch) as sent:
        assert api.record_instance(db_session, record(study, series, 2, 2.0), now=at(1)).created
    data_statements = [s for s in sent if s in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")]
    if db_session.get_bind().dialect.name == "postgresql":
        assert data_statements == ["WITH"]
    else:
        assert data_statements == ["SELECT", "INSERT", "UPDATE", "UPDATE"]
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 2


def test_the_first_instance_of_a_series_goes_the_long_way(db_session: Session,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A series not yet recorded by this engine: the batch takes the statements that can
    create it, in order, so its first instance fills in the study's details first."""
    study = uid()
    api.record_instance(db_session, record(study, uid(), 1, 1.0), now=T0)
    with counted_statements(db_session, monkeypatch) as sent:
        assert api.record_instance(db_session, record(study, uid(), 1, 1.0), now=at(1)).created
    assert "WITH" not in sent and "INSERT" in sent


def test_postgresql_sends_an_instances_statements_pipelined(db_session: Session,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg's pipeline mode: the statements whose results are read later go out
    together (three round trips for a new instance, not seven)."""
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, 1.0), now=T0)
    pipelined: list[bool] = []
    driver_execute = DriverStatement.execute

    def note_pipeline(self: DriverStatement, cursor: Any, values: Any) -> Any:
        pgconn = getattr(cursor.connection, "pgconn", None)
        pipelined.append(pgconn is not None and pgconn.pipeline_status != pq.PipelineStatus.OFF)
        return driver_execute(self, cursor, values)

    with monkeypatch.context() as patch:
        patch.setattr(DriverStatement, "execute", note_pipeline)
        outcomes = api.record_instances(db_session, [record(study, series, 2, 2.0), record(study, series, 3, 3.0)],
                                        now=at(1))
    assert [o.created for o in outcomes] == [True, True]
    if db_session.get_bind().dialect.name == "postgresql":
        assert pipelined == [True, True]  # one statement per instance
    else:
        assert pipelined == [False] * 5  # SELECT, two INSERTs, two UPDATEs
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 3


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_commits_before_it_reads_a_result(db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """One round trip: the instances' statements and the COMMIT go out together, so the
    study's row lock is not held while the receiver's thread waits to read results."""
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, 1.0), now=T0)
    calls: list[str] = []
    commit, fetchone, execute = psycopg.Connection.commit, psycopg.Cursor.fetchone, DriverStatement.execute

    def noted(name: str, method: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(self, *args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Connection, "commit", noted("commit", commit))
        patch.setattr(psycopg.Cursor, "fetchone", noted("fetch", fetchone))
        patch.setattr(DriverStatement, "execute", noted("execute", execute))
        outcomes = api.record_instances(db_session, [record(study, series, n, float(n)) for n in (2, 3)], now=at(1))
    assert [o.created for o in outcomes] == [True, True]
    assert calls == ["execute", "execute", "commit", "fetch", "fetch"]


def test_batch_shares_its_per_study_updates(db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, 1.0), now=T0)
    with counted_statements(db_session, monkeypatch) as sent:
        api.record_instances(db_session, [record(study, series, n, float(n)) for n in range(2, 12)], now=at(1))
    data_statements = [s for s in sent if s in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")]
    if db_session.get_bind().dialect.name == "postgresql":
        assert data_statements == ["WITH"] * 10  # each its own, all in one round trip
    else:
        assert data_statements == ["SELECT"] + ["INSERT"] * 10 + ["UPDATE", "UPDATE"]
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 11


def test_one_sop_under_two_studies_in_one_batch_ends_in_the_later(db_session: Session) -> None:
    study_a, study_b, series_a, series_b = uid(), uid(), uid(), uid()
    first = record(study_a, series_a, 1, 1.0)
    later = record(study_b, series_b, 1, 1.0, sop=first.sop_instance_uid)
    outcomes = api.record_instances(db_session, [first, later, record(study_a, series_a, 2, 2.0)], now=T0)
    assert [o.created for o in outcomes] == [True, False, True]
    instance = db_session.execute(
        select(Instance).where(Instance.sop_instance_uid == first.sop_instance_uid)).scalar_one()
    assert (instance.path, instance.series.series_instance_uid) == (later.path, series_b)
    counts = dict(db_session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
    assert counts == {series_a: 1, series_b: 1}
    moved = db_session.execute(
        select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "instance_moved")).scalar_one()
    assert moved == 2


def every_written_column(session: Session) -> dict[str, object]:
    """Every column the recording writes, as the database stores it (no type conversion
    on the way out), keyed by UIDs: not the ids, which may differ (a PostgreSQL sequence
    advances on an INSERT that meets a conflict)."""
    session.commit()

    def stored(table: Any, leave_out: tuple[str, ...], join: str = "", key: str = "") -> list[tuple[object, ...]]:
        names = [f"t.{c.name}" for c in table.columns if c.name not in ("id", *leave_out)]
        sql = f"SELECT {', '.join(names + ([key] if key else []))} FROM {table.name} t {join} ORDER BY 1, 2, 3"
        return [tuple(row) for row in session.execute(text(sql)).all()]

    return {
        "studies": stored(Study.__table__, ()),
        "series": stored(Series.__table__, ("study_id",), "JOIN studies k ON k.id = t.study_id",
                         "k.study_instance_uid"),
        "instances": stored(Instance.__table__, ("series_id",), "JOIN series k ON k.id = t.series_id",
                            "k.series_instance_uid"),
        "audits": sorted(session.execute(select(AuditEvent.action, func.count()).group_by(AuditEvent.action)).all()),
    }


def test_driver_path_writes_what_the_session_path_writes(db_sessions: sessionmaker[Session],
                                                        twin_sessions: sessionmaker[Session],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    records = random_arrivals(seed=11)
    first, rest = records[: len(records) // 2], records[len(records) // 2:]
    taken: list[int] = []
    on_driver = ingest._record_on_driver

    def counted(*args: Any, **kwargs: Any) -> Any:
        outcomes = on_driver(*args, **kwargs)
        taken.append(outcomes is not None)
        return outcomes

    def arrive(sessions: sessionmaker[Session]) -> tuple[dict[str, object], list[tuple[bool, bool]]]:
        with sessions() as session:
            # A new moment for each call, so that every study update shows.
            outcomes = [api.record_instance(session, r, now=at(n), durable=False) for n, r in enumerate(first[:4])]
            for start in range(4, len(first), 5):
                outcomes += api.record_instances(session, first[start:start + 5], now=at(start))
            api.sweep_completeness(session, at(3600), 60, 10, BUNDLES)
            for start in range(0, len(rest), 3):
                outcomes += api.record_instances(session, rest[start:start + 3], now=at(4000 + start), durable=False)
            return every_written_column(session), [(o.created, o.study_reopened) for o in outcomes]

    with monkeypatch.context() as patch:
        patch.setattr(ingest, "_record_on_driver", lambda *args, **kwargs: None)
        expected = arrive(twin_sessions)
    monkeypatch.setattr(ingest, "_record_on_driver", counted)
    assert arrive(db_sessions) == expected
    assert sum(taken) >= 3 and not all(taken)  # both paths ran: the comparison means something


def test_driver_path_leaves_nothing_of_a_failing_batch(db_session: Session) -> None:
    study, series = uid(), uid()
    api.record_instance(db_session, record(study, series, 1, 1.0), now=T0)
    good = record(study, series, 2, 2.0)
    bad = record(study, series, 3, 3.0, sop_class_uid=None)  # NOT NULL: the driver fails, the Session reports
    with pytest.raises(IntegrityError):
        api.record_instances(db_session, [good, bad], now=at(1))
    assert db_session.execute(select(func.count()).select_from(Instance)).scalar_one() == 1
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 1
    assert api.record_instance(db_session, good, now=at(2)).created
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 2
