"""Receiving: record instances and rejections (the receiver's only writes)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from db.engine import begin_write
from db.models import IngestRejection, Instance, ResultObject, Series, Study
from db.states import StudyState
from db.txn import IMAGE_MODALITIES, SYSTEM_ACTOR, add_audit, clock, insert_ignore, locked
from db.types import InstanceRecord, RecordOutcome

logger = logging.getLogger(__name__)


def record_instance(session: Session, rec: InstanceRecord, now: datetime | None = None) -> RecordOutcome:
    """Store one received instance (commits). Idempotent on SOP Instance UID.

    A new instance in a complete study reopens it (generation + 1) unless the
    instance is one of our own result objects echoed back by the PACS.
    A duplicate only refreshes path and size.
    """
    now = clock(now)
    begin_write(session)
    try:
        study = _upsert_study(session, rec, now)
        series_id = _upsert_series(session, rec, study.id)
        instance_id = insert_ignore(
            session,
            Instance,
            _instance_values(rec, series_id, study.generation, now),
            ["sop_instance_uid"],
        )
        if instance_id is None:
            _refresh_duplicate(session, rec)
            duplicate = RecordOutcome(created=False, study_reopened=False, study_id=study.id)
            session.commit()
            return duplicate
        session.execute(
            update(Series).where(Series.id == series_id).values(instance_count=Series.instance_count + 1)
        )
        reopened = _note_arrival(session, study, rec, now, instance_id)
        outcome = RecordOutcome(created=True, study_reopened=reopened, study_id=study.id)
        generation = study.generation
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if reopened:
        logger.info(
            "study reopened by a late arrival",
            extra={"action": "study_reopened", "study_uid": rec.study_instance_uid, "generation": generation},
        )
    return outcome


def _upsert_study(session: Session, rec: InstanceRecord, now: datetime) -> Study:
    # The row lock serialises concurrent arrivals for one study (reopen, generation).
    by_uid = locked(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
    study = session.execute(by_uid).scalar_one_or_none()
    if study is not None:
        return study
    insert_ignore(
        session,
        Study,
        {
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
            "flagged": False,
            "flag_comment": None,
            "reviewed": False,
            "confirmed_normal": False,
        },
        ["study_instance_uid"],
    )
    return session.execute(by_uid).scalar_one()


def _upsert_series(session: Session, rec: InstanceRecord, study_id: int) -> int:
    by_uid = select(Series.id).where(Series.series_instance_uid == rec.series_instance_uid)
    series_id = session.execute(by_uid).scalar_one_or_none()
    if series_id is not None:
        return series_id
    insert_ignore(
        session,
        Series,
        {
            "study_id": study_id,
            "series_instance_uid": rec.series_instance_uid,
            "modality": rec.modality,
            "series_number": rec.series_number,
            "series_description": rec.series_description,
            "instance_count": 0,
        },
        ["series_instance_uid"],
    )
    return session.execute(by_uid).scalar_one()


def _instance_values(rec: InstanceRecord, series_id: int, generation: int, now: datetime) -> dict[str, Any]:
    return {
        "series_id": series_id,
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
        "generation": generation,
    }


def _refresh_duplicate(session: Session, rec: InstanceRecord) -> None:
    session.execute(
        update(Instance)
        .where(
            Instance.sop_instance_uid == rec.sop_instance_uid,
            or_(Instance.path != rec.path, Instance.size_bytes != rec.size_bytes),
        )
        .values(path=rec.path, size_bytes=rec.size_bytes)
    )


def _note_arrival(session: Session, study: Study, rec: InstanceRecord, now: datetime, instance_id: int) -> bool:
    """Update the study for a new instance; returns True when it was reopened."""
    study.last_received_at = now
    study.purged_at = None
    if rec.modality in IMAGE_MODALITIES and study.modality not in IMAGE_MODALITIES:
        study.modality = rec.modality
    for attr in ("study_date", "patient_age", "patient_birth_date", "station_name", "institution"):
        if getattr(study, attr) is None and getattr(rec, attr) is not None:
            setattr(study, attr, getattr(rec, attr))
    if study.state != StudyState.COMPLETE or _is_own_result(session, rec.sop_instance_uid):
        return False
    study.state = StudyState.RECEIVING
    study.generation += 1
    study.completed_at = None
    # The instance row was inserted with the old generation before the reopen.
    session.execute(update(Instance).where(Instance.id == instance_id).values(generation=study.generation))
    add_audit(
        session,
        SYSTEM_ACTOR,
        "study_reopened",
        now,
        study.id,
        {"generation": study.generation, "sop_instance_uid": rec.sop_instance_uid},
    )
    return True


def _is_own_result(session: Session, sop_instance_uid: str) -> bool:
    return session.execute(
        select(exists().where(ResultObject.sop_instance_uid == sop_instance_uid))
    ).scalar_one()


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
