"""Worker reads and retention: a study's files, result objects, purge."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from headscreen.db import blobs
from headscreen.db.engine import write_transaction
from headscreen.db.models import Delivery, Instance, Job, Result, ResultObject, Series, Study
from headscreen.db.states import DeliveryState, JobState, StudyState
from headscreen.db.txn import (
    ACTIVE_JOB_STATES,
    OPEN_DELIVERY_STATES,
    SYSTEM_ACTOR,
    add_audit,
    clock,
    end_read,
    execute_counted,
    locked,
)
from headscreen.db.types import OutputObject, StudyNotFound

logger = logging.getLogger(__name__)


def study_instances(session: Session, study_id: int) -> dict[str, list[tuple[str, str]]]:
    """Series UID -> [(relative path, SOP Instance UID)] for the worker (read-only)."""
    rows = session.execute(
        select(Series.series_instance_uid, Instance.path, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.id, Instance.instance_number, Instance.slice_position, Instance.id)
    ).all()
    end_read(session)
    grouped: dict[str, list[tuple[str, str]]] = {}
    for series_uid, path, sop_uid in rows:
        grouped.setdefault(series_uid, []).append((path, sop_uid))
    return grouped


def get_result_objects(session: Session, result_id: int) -> list[OutputObject]:
    rows = session.execute(
        select(ResultObject).where(ResultObject.result_id == result_id).order_by(ResultObject.id)
    ).scalars().all()
    out = [OutputObject(o.sop_instance_uid, o.sop_class_uid, str(o.kind), o.path) for o in rows]
    end_read(session)
    return out


def retention_candidates(session: Session, older_than: datetime) -> list[tuple[int, str]]:
    """(study id, uid) of complete studies finished before `older_than` with nothing left to do
    (no active job, no open delivery) whose instances are not yet purged (read-only)."""
    older_than = clock(older_than)
    active_job = exists().where(Job.study_id == Study.id, Job.state.in_(ACTIVE_JOB_STATES))
    open_delivery = (
        exists()
        .where(
            Result.study_id == Study.id,
            ResultObject.result_id == Result.id,
            Delivery.result_object_id == ResultObject.id,
            Delivery.state.in_(OPEN_DELIVERY_STATES),
        )
    )
    rows = session.execute(
        select(Study.id, Study.study_instance_uid)
        .where(
            Study.state == StudyState.COMPLETE,
            Study.completed_at < older_than,
            Study.purged_at.is_(None),
            ~active_job,
            ~open_delivery,
        )
        .order_by(Study.completed_at, Study.id)
    ).all()
    end_read(session)
    return [(study_id, uid) for study_id, uid in rows]


def mark_purged(session: Session, study_id: int, actor: str = SYSTEM_ACTOR, now: datetime | None = None, *,
                with_blobs: bool = False) -> int:
    """Delete the study's instance rows, keeping study, results and audit (commits, audited).

    The caller deletes the files; `with_blobs` (the PostgreSQL storage backend) deletes the
    instances' bytes in this transaction (db.blobs). Returns the number of instance rows deleted.
    """
    now = clock(now)
    with write_transaction(session):
        study = session.execute(locked(select(Study).where(Study.id == study_id))).scalar_one_or_none()
        if study is None:
            raise StudyNotFound(f"no study with id {study_id}")
        if with_blobs:
            blobs.delete_study_instances(session, study.study_instance_uid)
        series_ids = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
        deleted = execute_counted(session, delete(Instance).where(Instance.series_id.in_(series_ids)))
        session.execute(update(Series).where(Series.study_id == study_id).values(instance_count=0))
        study.purged_at = now
        add_audit(session, actor, "study_purged", now, study_id, {"instances": deleted})
    logger.info("study purged", extra={"action": "study_purged", "study_id": study_id, "instances": deleted})
    return deleted


def counts(session: Session) -> dict[str, dict[str, int]]:
    """Studies, jobs and deliveries by state (every state listed, zero when none)."""
    out: dict[str, dict[str, int]] = {}
    for name, model, states in (
        ("studies", Study, StudyState),
        ("jobs", Job, JobState),
        ("deliveries", Delivery, DeliveryState),
    ):
        rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
        found: dict[str, int] = {str(state): count for state, count in rows}
        out[name] = {str(state): int(found.get(str(state), 0)) for state in states}
    end_read(session)
    return out
