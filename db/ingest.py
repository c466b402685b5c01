"""Receiving: record instances and rejections (the receiver's only writes).

The instance path is the receiver's hot path, so it runs a few Core statements
built once at import (their compiled SQL is cached): for a known study and series
one SELECT, one INSERT ... ON CONFLICT DO NOTHING, and one UPDATE each of the
series and the study. `record_instances` does the same for many instances in one
transaction, so concurrent associations share one commit (one journal fsync). On
PostgreSQL the four are one statement per instance, sent with the commit in one round
trip (psycopg's pipeline mode), so the study's row lock is never held across a wait of
the receiver's threads.

A SOP Instance UID already recorded under another series (so, usually, another
study) is moved: the later send wins. The row takes the new series, path and
header facts; both studies are re-evaluated (a complete one reopens, generation + 1;
either's quiet period restarts) and each gets an `instance_moved` audit event.
The file at the old path then has no row, and the storage sweep removes it
(daemon.storage.sweep_debris).

The receiver commits with `durable=False` when its ingest journal already holds a
durable copy of each instance (daemon/ingest_journal.py): the commit then does not
wait for the disk, and `make_commits_durable` later flushes everything committed so
far at once, before the journal lets go of those instances.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, case, exists, func, or_, select, text, update
from sqlalchemy.engine import Connection, CursorResult, Dialect, Engine
from sqlalchemy.orm import Session

from headscreen.db import blobs
from headscreen.db.driver_sql import DriverStatement
from headscreen.db.engine import begin_driver_write, begin_write, write_transaction
from headscreen.db.models import IngestRejection, Instance, ResultObject, Series, Study, UTCDateTime
from headscreen.db.states import StudyState
from headscreen.db.txn import IMAGE_MODALITIES, SYSTEM_ACTOR, add_audit, clock, end_read, insert_ignore
from headscreen.db.types import InstanceRecord, RecordOutcome

logger = logging.getLogger(__name__)

# Core tables (Table, not the FromClause that __table__ is typed as).
_studies = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_instances = cast(Table, Instance.__table__)
# Study columns filled from the first instance that has them (never overwritten).
_FILLED_STUDY_ATTRS = ("study_date", "patient_age", "patient_birth_date", "station_name", "institution",
                       "accession_number", "patient_id")

# The study (row-locked on PostgreSQL: it serialises arrivals for one study, reopen and
# generation) and the series id when the series exists, in one round trip.
_STUDY_AND_SERIES = (
    select(_studies.c.id, _studies.c.generation, _studies.c.state, _series.c.id.label("series_id"))
    .select_from(_studies.outerjoin(_series, _series.c.series_instance_uid == bindparam("series_uid")))
    .where(_studies.c.study_instance_uid == bindparam("study_uid"))
    .with_for_update(of=_studies, key_share=True)
)
# text(), not the dialects' insert().on_conflict_do_nothing(): SQLAlchemy cannot cache the
# compiled form of those, and compiling the INSERT cost more than running it. Same SQL on
# SQLite and PostgreSQL.
_INSTANCE_COLUMNS = [c.name for c in _instances.columns if c.name != "id"]
_INSERT_INSTANCE = text(
    f"INSERT INTO {_instances.name} ({', '.join(_INSTANCE_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in _INSTANCE_COLUMNS)}) "
    "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
).bindparams(*(bindparam(c.name, type_=c.type) for c in _instances.columns if c.name != "id"))
_EXISTING_INSTANCE = (
    select(_instances.c.id, _instances.c.series_id, _series.c.study_id)
    .select_from(_instances.join(_series, _series.c.id == _instances.c.series_id))
    .where(_instances.c.sop_instance_uid == bindparam("b_sop"))
)
_REFRESH_DUPLICATE = (
    update(_instances)
    .where(
        _instances.c.id == bindparam("b_id"),
        or_(_instances.c.path != bindparam("b_path"), _instances.c.size_bytes != bindparam("b_size")),
    )
    .values(path=bindparam("b_path"), size_bytes=bindparam("b_size"))
)
# What a move rewrites: everything the later send says about the instance.
_MOVED_COLUMNS = (
    "series_id", "sop_class_uid", "transfer_syntax_uid", "path", "size_bytes", "instance_number",
    "slice_position", "images_in_acquisition", "number_of_frames", "received_at", "generation",
)
_MOVE_INSTANCE = (
    update(_instances)
    .where(_instances.c.id == bindparam("b_id"))
    .values(**{name: bindparam(f"b_{name}", type_=_instances.c[name].type) for name in _MOVED_COLUMNS})
)
_LOCK_STUDY_BY_ID = (
    select(_studies.c.id, _studies.c.study_instance_uid, _studies.c.generation, _studies.c.state)
    .where(_studies.c.id == bindparam("b_study_id"))
    .with_for_update(of=_studies, key_share=True)
)
# A study that lost an instance: its quiet period restarts, as after an arrival.
_RESTART_QUIET = (
    update(_studies)
    .where(_studies.c.id == bindparam("b_study_id"))
    .values(last_received_at=bindparam("b_now", type_=UTCDateTime()))
)
_PATHS_OF_SOPS = select(_instances.c.path).where(_instances.c.sop_instance_uid.in_(bindparam("b_sops", expanding=True)))
_PATHS_CHUNK = 500
_COUNT_INSTANCES = (
    update(_series)
    .where(_series.c.id == bindparam("b_series_id"))
    .values(instance_count=_series.c.instance_count + bindparam("b_added"))
)
_TOUCH_STUDY = (
    update(_studies)
    .where(_studies.c.id == bindparam("b_study_id"))
    .values(
        last_received_at=bindparam("b_now", type_=UTCDateTime()),
        purged_at=None,
        # An image instance gives a study known only from other objects its modality.
        modality=case(
            (or_(*(_studies.c.modality == modality for modality in sorted(IMAGE_MODALITIES))), _studies.c.modality),
            else_=func.coalesce(bindparam("b_image_modality", type_=String()), _studies.c.modality),
        ),
        **{
            attr: func.coalesce(_studies.c[attr], bindparam(f"b_{attr}", type_=String()))
            for attr in _FILLED_STUDY_ATTRS
        },
    )
)
# PostgreSQL, the common case in ONE statement: look up and lock the study (still
# receiving) and its known series, insert the instance, count it and touch the study.
# Sent with its COMMIT in one round trip, the study's row lock is held only inside the
# server, never across a wait of the receiver's threads for the GIL (which is what made
# concurrent associations queue on it). A row that needs more (new study or series, a
# duplicate or move, a reopen) writes nothing and comes back without an instance id.
_ONE_TRIP_INSTANCE = text(
    "WITH target AS ("
    f" SELECT st.id AS study_id, st.generation, se.id AS series_id FROM {_studies.name} AS st"
    f" JOIN {_series.name} AS se ON se.series_instance_uid = :series_uid"
    " WHERE st.study_instance_uid = :study_uid AND st.state = :receiving FOR NO KEY UPDATE OF st"
    "), inserted AS ("
    f" INSERT INTO {_instances.name} ({', '.join(_INSTANCE_COLUMNS)})"
    " SELECT " + ", ".join("target." + name if name in ("series_id", "generation") else ":" + name
                           for name in _INSTANCE_COLUMNS) + " FROM target"
    " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id, series_id"
    "), counted AS ("
    f" UPDATE {_series.name} SET instance_count = {_series.name}.instance_count + 1"
    f" FROM inserted WHERE {_series.name}.id = inserted.series_id"
    "), touched AS ("
    f" UPDATE {_studies.name} SET last_received_at = :received_at, purged_at = NULL,"
    f" modality = CASE WHEN {_studies.name}.modality IN ("
    + ", ".join(f"'{modality}'" for modality in sorted(IMAGE_MODALITIES)) + f") THEN {_studies.name}.modality"
    f" ELSE coalesce(:b_image_modality, {_studies.name}.modality) END, "
    + ", ".join(f"{attr} = coalesce({_studies.name}.{attr}, :b_{attr})" for attr in _FILLED_STUDY_ATTRS)
    + f" FROM target, inserted WHERE {_studies.name}.id = target.study_id"
    ") SELECT target.study_id, inserted.id FROM target LEFT JOIN inserted ON true"
).bindparams(
    *(bindparam(c.name, type_=c.type) for c in _instances.columns if c.name not in ("id", "series_id", "generation")),
    bindparam("series_uid", type_=String()), bindparam("study_uid", type_=String()),
    bindparam("receiving", type_=_studies.c.state.type), bindparam("b_image_modality", type_=String()),
    *(bindparam(f"b_{attr}", type_=String()) for attr in _FILLED_STUDY_ATTRS),
)
_REOPEN_STUDY = (
    update(_studies)
    .where(_studies.c.id == bindparam("b_study_id"))
    .values(state=StudyState.RECEIVING, generation=_studies.c.generation + 1, completed_at=None)
)
_SET_INSTANCE_GENERATION = (
    update(_instances).where(_instances.c.id == bindparam("b_id")).values(generation=bindparam("b_generation"))
)


@dataclass
class _StudyState:
    """What one transaction knows of a study it has locked."""

    id: int
    generation: int
    state: StudyState
    records: list[InstanceRecord] = field(default_factory=list)
    # Lost an instance to another study (its quiet period restarts).
    lost_instance: bool = False


@dataclass
class _Batch:
    """Per-transaction caches and the deferred study/series updates."""

    now: datetime
    studies: dict[str, _StudyState] = field(default_factory=dict)
    series_ids: dict[str, int] = field(default_factory=dict)
    added_per_series: dict[int, int] = field(default_factory=dict)
    reopened: list[tuple[str, int]] = field(default_factory=list)
    moved: list[tuple[int, int]] = field(default_factory=list)


def record_instance(session: Session, rec: InstanceRecord, now: datetime | None = None, *,
                    durable: bool = True, payload: bytes | None = None) -> RecordOutcome:
    """Store one received instance (commits). Idempotent on SOP Instance UID.

    A new instance in a complete study reopens it (generation + 1) unless the
    instance is one of our own result objects echoed back by the PACS.
    A duplicate in the same series only refreshes path and size; one sent under
    another series or study is moved there (see the module docstring).
    """
    return record_instances(session, [rec], now, durable=durable,
                            payloads=None if payload is None else [payload])[0]


def record_instances(
    session: Session, records: Sequence[InstanceRecord], now: datetime | None = None, *, durable: bool = True,
    payloads: Sequence[bytes] | None = None,
) -> list[RecordOutcome]:
    """Store many received instances in ONE transaction (commits); outcomes in order.

    Each instance gets exactly the semantics of `record_instance`; the commit (and
    so the journal fsync) is shared. If any row fails, nothing is committed, except on
    PostgreSQL the rows of the common case (committed in one round trip before the others
    are recorded); recording is idempotent, so a retry of the batch finds them.
    `durable=False`: the commit does not wait for the disk (see the module docstring).
    `payloads` (the PostgreSQL storage backend): each instance's bytes, stored under its
    path in the same transaction (db.blobs), so no row is ever committed without them.
    """
    moment = clock(now)
    outcomes = _record_instances(session, records, moment, durable=durable, payloads=payloads)
    known = _known_series(session)
    if known is not None:
        known.add(records)
    return outcomes


def _record_instances(session: Session, records: Sequence[InstanceRecord], moment: datetime, *,
                      durable: bool, payloads: Sequence[bytes] | None) -> list[RecordOutcome]:
    if payloads is None:
        driven = _record_on_driver(session, records, _Batch(now=moment), durable=durable)
        if driven is not None:
            left = [rec for rec, outcome in zip(records, driven, strict=True) if outcome is None]
            if not left:
                return cast(list[RecordOutcome], driven)
            # Rows the one-trip statements left alone (they committed the others).
            rest = iter(_record_through_session(session, left, moment, durable=durable, payloads=None))
            return [outcome if outcome is not None else next(rest) for outcome in driven]
    return _record_through_session(session, records, moment, durable=durable, payloads=payloads)


def _record_through_session(session: Session, records: Sequence[InstanceRecord], moment: datetime, *,
                            durable: bool, payloads: Sequence[bytes] | None) -> list[RecordOutcome]:
    """Every case (a new study or series, a duplicate, a move, a reopen, the bytes stored
    with the rows), through the Session in one transaction."""
    batch = _Batch(now=moment)
    with write_transaction(session, relaxed=not durable):
        connection = session.connection()
        outcomes = [_record_in_transaction(session, connection, batch, rec) for rec in records]
        _apply_deferred_updates(connection, batch)
        if payloads is not None:
            blobs.put(connection, blobs.INSTANCE, [(rec.path, rec.study_instance_uid, data)
                                                   for rec, data in zip(records, payloads, strict=True)], batch.now)
    for study_uid, generation in batch.reopened:
        logger.info(
            "study reopened by a late arrival",
            extra={"action": "study_reopened", "study_uid": study_uid, "generation": generation},
        )
    for from_study_id, to_study_id in batch.moved:
        logger.warning(
            "instance re-sent under another series or study; moved there",
            extra={"action": "instance_moved", "from_study_id": from_study_id, "to_study_id": to_study_id},
        )
    return outcomes


@dataclass(frozen=True)
class _DriverStatements:
    """The common case's statements, compiled for one dialect (db.driver_sql)."""

    study_and_series: DriverStatement
    insert_instance: DriverStatement
    count_instances: DriverStatement
    touch_study: DriverStatement
    receiving: Any  # StudyState.RECEIVING as the database stores it
    one_trip: DriverStatement | None  # PostgreSQL's _ONE_TRIP_INSTANCE


class _RecentSeries:
    """Series UIDs this process recorded instances of lately: a hint that a batch is the
    common case. One-trip statements commit the rows they can and leave the others to the
    Session path, after them; only a batch of known series goes that way, so that the
    first instance of a series still fills in its study's details first."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._uids: dict[str, None] = {}
        self._lock = threading.Lock()

    def has_all(self, records: Sequence[InstanceRecord]) -> bool:
        return all(rec.series_instance_uid in self._uids for rec in records)

    def add(self, records: Sequence[InstanceRecord]) -> None:
        with self._lock:
            for rec in records:
                self._uids.pop(rec.series_instance_uid, None)
                self._uids[rec.series_instance_uid] = None
            while len(self._uids) > self._size:
                del self._uids[next(iter(self._uids))]


_KNOWN_SERIES: weakref.WeakKeyDictionary[Engine, _RecentSeries] = weakref.WeakKeyDictionary()


def _known_series(session: Session) -> _RecentSeries | None:
    """The engine's recent series; None where no one-trip statement exists (SQLite)."""
    engine = session.get_bind()
    if not isinstance(engine, Engine) or engine.dialect.name != "postgresql":
        return None
    known = _KNOWN_SERIES.get(engine)
    if known is None:
        known = _KNOWN_SERIES.setdefault(engine, _RecentSeries())
    return known
_DRIVER_STATEMENTS: weakref.WeakKeyDictionary[Dialect, _DriverStatements] = weakref.WeakKeyDictionary()
_DRIVERS = {("sqlite", "pysqlite"), ("postgresql", "psycopg")}


def _driver_statements(dialect: Dialect) -> _DriverStatements | None:
    if (dialect.name, dialect.driver) not in _DRIVERS:
        return None
    statements = _DRIVER_STATEMENTS.get(dialect)
    if statements is None:
        state_to_db = _studies.c.state.type.dialect_impl(dialect).bind_processor(dialect)
        statements = _DriverStatements(
            DriverStatement(_STUDY_AND_SERIES, dialect), DriverStatement(_INSERT_INSTANCE, dialect),
            DriverStatement(_COUNT_INSTANCES, dialect), DriverStatement(_TOUCH_STUDY, dialect),
            state_to_db(StudyState.RECEIVING) if state_to_db else StudyState.RECEIVING,
            DriverStatement(_ONE_TRIP_INSTANCE, dialect) if dialect.name == "postgresql" else None)
        _DRIVER_STATEMENTS[dialect] = statements
    return statements


def _record_on_driver(session: Session, records: Sequence[InstanceRecord], batch: _Batch, *,
                      durable: bool) -> list[RecordOutcome | None] | None:
    """The common case, new instances of a known series of a study still receiving, on
    the DB-API connection: the same statements and values as the Session path at a
    fraction of its CPU (the receiver records every instance). None, with nothing
    committed, when the driver fails or (SQLite) any instance needs more (a new study or
    series, a duplicate or a move, a reopen): the caller then records the whole batch
    through the Session, which also retries and reports errors. On PostgreSQL each
    instance is one statement and the batch one round trip with its commit; an outcome
    is None for an instance that needs more, which that statement left unwritten."""
    engine = session.get_bind()
    if not isinstance(engine, Engine) or not records:
        return None  # a session bound to a connection keeps its own transaction
    statements = _driver_statements(engine.dialect)
    if statements is None:
        return None
    if session.in_transaction():
        session.commit()  # as begin_write: each db.api function owns its transaction
    raw = engine.raw_connection()
    try:
        with _pipelined(raw):
            begin_driver_write(engine.dialect.name, raw, relaxed=not durable)
            known = _known_series(session)
            if statements.one_trip is not None and known is not None and known.has_all(records):
                return _new_instances_in_one_trip(raw, statements, records, batch)
            outcomes = _new_instances_of_known_series(raw, statements, records, batch)
            if outcomes is None:
                raw.rollback()
                return None
            raw.commit()
        return [*outcomes]
    except Exception:
        logger.debug("driver path failed; recording through the Session", exc_info=True)
        try:
            raw.rollback()
        except Exception:
            raw.invalidate()
        return None
    finally:
        raw.close()


def _pipelined(raw: Any) -> contextlib.AbstractContextManager[Any]:
    """psycopg's pipeline mode: statements whose results are not needed yet go out
    together, so a new instance costs three round trips (begin and look up; insert and
    update; commit) instead of seven. Other drivers run each statement as it comes."""
    pipeline = getattr(raw.driver_connection, "pipeline", None)
    return pipeline() if pipeline is not None else contextlib.nullcontext()


def _new_instances_in_one_trip(raw: Any, statements: _DriverStatements, records: Sequence[InstanceRecord],
                               batch: _Batch) -> list[RecordOutcome | None]:
    """Every instance's statement and the commit go out together (psycopg's pipeline);
    the results are read once the commit is back."""
    assert statements.one_trip is not None
    cursors: list[Any] = []
    try:
        for rec in records:
            cursor = raw.cursor()
            cursors.append(cursor)
            # The series id and generation come from the statement's own look-up.
            statements.one_trip.execute(cursor, {**_instance_facts(rec, batch.now), **_study_fill_params([rec]),
                                                 "series_uid": rec.series_instance_uid,
                                                 "study_uid": rec.study_instance_uid,
                                                 "receiving": StudyState.RECEIVING})
        raw.commit()
        outcomes: list[RecordOutcome | None] = []
        for cursor in cursors:
            row = cursor.fetchone()
            done = row is not None and row[1] is not None
            outcomes.append(RecordOutcome(created=True, study_reopened=False, study_id=row[0]) if done else None)
        return outcomes
    finally:
        for cursor in cursors:
            cursor.close()


def _new_instances_of_known_series(raw: Any, statements: _DriverStatements, records: Sequence[InstanceRecord],
                                   batch: _Batch) -> list[RecordOutcome] | None:
    """Each INSERT has its own cursor and is read only once the updates are queued (in
    pipeline mode a read waits for the server). A row already recorded (a duplicate or
    a move) means None, and the caller rolls the updates back with it."""
    cursors: list[Any] = []
    inserted: list[tuple[Any, _StudyState]] = []
    try:
        for rec in records:
            study = batch.studies.get(rec.study_instance_uid)
            if study is None or rec.series_instance_uid not in batch.series_ids:
                lookup = raw.cursor()
                cursors.append(lookup)
                row = statements.study_and_series.execute(lookup, {
                    "study_uid": rec.study_instance_uid, "series_uid": rec.series_instance_uid}).fetchone()
                if row is None or row[3] is None or row[2] != statements.receiving:
                    return None
                if study is None:
                    study = _StudyState(id=row[0], generation=row[1], state=StudyState.RECEIVING)
                    batch.studies[rec.study_instance_uid] = study
                batch.series_ids[rec.series_instance_uid] = row[3]
            series_id = batch.series_ids[rec.series_instance_uid]
            insert = raw.cursor()
            cursors.append(insert)
            statements.insert_instance.execute(insert, _instance_values(rec, series_id, study.generation, batch.now))
            inserted.append((insert, study))
            batch.added_per_series[series_id] = batch.added_per_series.get(series_id, 0) + 1
            study.records.append(rec)
        updates = raw.cursor()
        cursors.append(updates)
        for series_id, added in batch.added_per_series.items():
            statements.count_instances.execute(updates, {"b_series_id": series_id, "b_added": added})
        for study in batch.studies.values():
            statements.touch_study.execute(updates, _study_touch_params(study, batch.now))
        if any(insert.fetchone() is None for insert, _ in inserted):
            return None
        return [RecordOutcome(created=True, study_reopened=False, study_id=study.id) for _, study in inserted]
    finally:
        for cursor in cursors:
            cursor.close()


def _record_in_transaction(
    session: Session, connection: Connection, batch: _Batch, rec: InstanceRecord
) -> RecordOutcome:
    study = _locked_study(session, connection, batch, rec)
    series_id = batch.series_ids[rec.series_instance_uid]
    instance_id = connection.execute(
        _INSERT_INSTANCE, _instance_values(rec, series_id, study.generation, batch.now)
    ).scalar_one_or_none()
    if instance_id is None:
        existing = connection.execute(_EXISTING_INSTANCE, {"b_sop": rec.sop_instance_uid}).one()
        if existing.series_id == series_id:
            connection.execute(_REFRESH_DUPLICATE, {"b_id": existing.id, "b_path": rec.path, "b_size": rec.size_bytes})
            return RecordOutcome(created=False, study_reopened=False, study_id=study.id)
        reopened = _move_instance(session, connection, batch, study, series_id, rec, existing)
        return RecordOutcome(created=False, study_reopened=reopened, study_id=study.id)
    batch.added_per_series[series_id] = batch.added_per_series.get(series_id, 0) + 1
    study.records.append(rec)
    reopened = _reopen_if_complete(session, connection, batch, study, rec, instance_id)
    return RecordOutcome(created=True, study_reopened=reopened, study_id=study.id)


def _move_instance(
    session: Session, connection: Connection, batch: _Batch, study: _StudyState, series_id: int,
    rec: InstanceRecord, existing: Any,
) -> bool:
    """The later send wins: the row moves to `series_id` of `study` (already locked).
    Returns True when `study` was reopened."""
    old = study if existing.study_id == study.id else _locked_study_by_id(connection, batch, existing.study_id)
    values = _instance_values(rec, series_id, study.generation, batch.now)
    connection.execute(_MOVE_INSTANCE, {"b_id": existing.id, **{f"b_{n}": values[n] for n in _MOVED_COLUMNS}})
    for moved_series, step in ((existing.series_id, -1), (series_id, 1)):
        batch.added_per_series[moved_series] = batch.added_per_series.get(moved_series, 0) + step
    study.records.append(rec)
    reopened = _reopen_if_complete(session, connection, batch, study, rec, existing.id)
    if old is not study:
        old.lost_instance = True
        _reopen_if_complete(session, connection, batch, old, rec, None)
    detail = {"sop_instance_uid": rec.sop_instance_uid, "from_study_id": old.id, "to_study_id": study.id,
              "from_generation": old.generation, "to_generation": study.generation}
    for audited in dict.fromkeys((old.id, study.id)):
        add_audit(session, SYSTEM_ACTOR, "instance_moved", batch.now, audited, detail)
    batch.moved.append((old.id, study.id))
    return reopened


def _locked_study_by_id(connection: Connection, batch: _Batch, study_id: int) -> _StudyState:
    """A study this transaction has not touched yet, locked (or the one it already holds)."""
    row = connection.execute(_LOCK_STUDY_BY_ID, {"b_study_id": study_id}).one()
    known = batch.studies.get(row.study_instance_uid)
    if known is not None:
        return known
    study = _StudyState(id=row.id, generation=row.generation, state=row.state)
    batch.studies[row.study_instance_uid] = study
    return study


def _locked_study(session: Session, connection: Connection, batch: _Batch, rec: InstanceRecord) -> _StudyState:
    """The study of `rec`, locked for this transaction, with its series id cached in `batch`.

    Creates the study and series rows when they are new (ON CONFLICT DO NOTHING, so
    concurrent creators do not fail).
    """
    study = batch.studies.get(rec.study_instance_uid)
    if study is not None and rec.series_instance_uid in batch.series_ids:
        return study
    row = _select_study(connection, rec)
    if row is None:
        insert_ignore(session, Study, _new_study_values(rec, batch.now), ["study_instance_uid"])
        row = _select_study(connection, rec)
        if row is None:  # pragma: no cover - the row was just inserted or already there
            raise RuntimeError("study row vanished inside its own transaction")
    if study is None:
        study = _StudyState(id=row.id, generation=row.generation, state=row.state)
        batch.studies[rec.study_instance_uid] = study
    series_id = row.series_id
    if series_id is None:
        insert_ignore(session, Series, _new_series_values(rec, study.id), ["series_instance_uid"])
        series_id = session.execute(
            select(Series.id).where(Series.series_instance_uid == rec.series_instance_uid)
        ).scalar_one()
    batch.series_ids[rec.series_instance_uid] = series_id
    return study


def _select_study(connection: Connection, rec: InstanceRecord) -> Any:
    params = {"study_uid": rec.study_instance_uid, "series_uid": rec.series_instance_uid}
    return connection.execute(_STUDY_AND_SERIES, params).first()


def _new_study_values(rec: InstanceRecord, now: datetime) -> dict[str, Any]:
    return {
        "study_instance_uid": rec.study_instance_uid,
        "modality": rec.modality,
        "state": StudyState.RECEIVING,
        "generation": 1,
        "first_received_at": now,
        "last_received_at": now,
        "completed_at": None,
        "purged_at": None,
        "study_date": rec.study_date,
        "patient_age": rec.patient_age,
        "patient_birth_date": rec.patient_birth_date,
        "station_name": rec.station_name,
        "institution": rec.institution,
        "calling_ae": rec.calling_ae,
        "accession_number": rec.accession_number,
        "patient_id": rec.patient_id,
        "flagged": False,
        "flag_comment": None,
        "reviewed": False,
        "confirmed_normal": False,
    }


def _new_series_values(rec: InstanceRecord, study_id: int) -> dict[str, Any]:
    return {
        "study_id": study_id,
        "series_instance_uid": rec.series_instance_uid,
        "modality": rec.modality,
        "series_number": rec.series_number,
        "series_description": rec.series_description,
        "instance_count": 0,
    }


def _instance_values(rec: InstanceRecord, series_id: int, generation: int, now: datetime) -> dict[str, Any]:
    return {**_instance_facts(rec, now), "series_id": series_id, "generation": generation}


def _instance_facts(rec: InstanceRecord, now: datetime) -> dict[str, Any]:
    """An instance row's values that the instance itself gives (not its series or generation)."""
    return {
        "sop_instance_uid": rec.sop_instance_uid,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "path": rec.path,
        "size_bytes": rec.size_bytes,
        "instance_number": rec.instance_number,
        "slice_position": rec.slice_position,
        "images_in_acquisition": rec.images_in_acquisition,
        "number_of_frames": rec.number_of_frames,
        "received_at": now,
    }


def _reopen_if_complete(
    session: Session, connection: Connection, batch: _Batch, study: _StudyState, rec: InstanceRecord,
    instance_id: int | None,
) -> bool:
    """Reopen a complete study whose content changed by `rec` (its instance row
    `instance_id`, or None when the instance left the study); True when reopened."""
    if study.state != StudyState.COMPLETE or _is_own_result(connection, rec.sop_instance_uid):
        return False
    connection.execute(_REOPEN_STUDY, {"b_study_id": study.id})
    study.state = StudyState.RECEIVING
    study.generation += 1
    if instance_id is not None:
        # The instance row was written with the old generation before the reopen.
        connection.execute(_SET_INSTANCE_GENERATION, {"b_id": instance_id, "b_generation": study.generation})
    add_audit(
        session,
        SYSTEM_ACTOR,
        "study_reopened",
        batch.now,
        study.id,
        {"generation": study.generation, "sop_instance_uid": rec.sop_instance_uid},
    )
    batch.reopened.append((rec.study_instance_uid, study.generation))
    return True


def _is_own_result(connection: Connection, sop_instance_uid: str) -> bool:
    own = select(exists().where(ResultObject.sop_instance_uid == sop_instance_uid))
    return bool(connection.execute(own).scalar_one())


def _apply_deferred_updates(connection: Connection, batch: _Batch) -> None:
    """One UPDATE per touched series (instance count) and per touched study."""
    for series_id, added in batch.added_per_series.items():
        connection.execute(_COUNT_INSTANCES, {"b_series_id": series_id, "b_added": added})
    for study in batch.studies.values():
        if study.records:
            connection.execute(_TOUCH_STUDY, _study_touch_params(study, batch.now))
        elif study.lost_instance:
            connection.execute(_RESTART_QUIET, {"b_study_id": study.id, "b_now": batch.now})


def _study_touch_params(study: _StudyState, now: datetime) -> dict[str, Any]:
    """Bind values for _TOUCH_STUDY."""
    return {"b_study_id": study.id, "b_now": now, **_study_fill_params(study.records)}


def _study_fill_params(records: Sequence[InstanceRecord]) -> dict[str, Any]:
    """The study details the new instances give: the first non-empty value of each."""
    image_modality = next((r.modality for r in records if r.modality in IMAGE_MODALITIES), None)
    params: dict[str, Any] = {"b_image_modality": image_modality}
    for attr in _FILLED_STUDY_ATTRS:
        params[f"b_{attr}"] = next((getattr(r, attr) for r in records if getattr(r, attr) is not None), None)
    return params


def make_commits_durable(session: Session) -> None:
    """Make every transaction committed so far durable, relaxed ones included.

    PostgreSQL: a transaction with an id commits synchronously, which flushes the WAL up
    to its commit record, so every earlier commit too. SQLite (WAL, synchronous=NORMAL
    for relaxed commits): its checkpoints sync the database file, so fsyncing the WAL
    and the database file covers every commit.
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT txid_current()"))
        session.commit()
        return
    database = bind.engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    end_read(session)
    for path in (f"{database}-wal", database):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # no WAL: everything is in the (checkpoint-synced) database file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recorded_instance_paths(session: Session, paths: Iterable[str]) -> set[str]:
    """Those of `paths` (relative to the storage root) that an instance row points at
    (read-only). Looked up by the SOP Instance UID in the file name (indexed) and
    compared by the whole path, so a file of a moved instance counts as unrecorded."""
    wanted = set(paths)
    sops = sorted({PurePosixPath(p).name.removesuffix(".dcm") for p in wanted})
    found: set[str] = set()
    for start in range(0, len(sops), _PATHS_CHUNK):
        chunk = sops[start:start + _PATHS_CHUNK]
        found.update(session.execute(_PATHS_OF_SOPS, {"b_sops": chunk}).scalars())
    end_read(session)
    return found & wanted


def record_association_released(session: Session, study_uids: Iterable[str], now: datetime | None = None) -> int:
    """Stamp `released_at` on the studies still receiving among `study_uids`, those an
    association stored instances of and has now ended in an A-RELEASE (db.sweep's
    `released_quiet_s`). Returns how many were stamped."""
    uids = sorted(set(study_uids))
    if not uids:
        return 0
    now = clock(now)
    statement = (update(Study)
                 .where(Study.study_instance_uid.in_(uids), Study.state == StudyState.RECEIVING)
                 .values(released_at=now)
                 .execution_options(synchronize_session=False))
    with write_transaction(session):
        stamped = cast(CursorResult[Any], session.execute(statement)).rowcount
    return int(stamped or 0)


def record_rejection(
    session: Session,
    calling_ae: str | None,
    reason: str,
    status: int,
    sop_instance_uid: str | None = None,
    sop_class_uid: str | None = None,
    now: datetime | None = None,
) -> int:
    """Record an instance the receiver refused (commits); returns the rejection id."""
    now = clock(now)
    begin_write(session)
    row = IngestRejection(
        at=now,
        calling_ae=calling_ae,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        status=status,
        reason=reason,
    )
    session.add(row)
    session.commit()
    return row.id
