"""The only functions that change the state of studies, jobs, results and deliveries.

Every function takes a Session first and commits its own transaction (a transaction
the caller left open is committed first). They are safe with several processes on
one database: SQLite write transactions are BEGIN IMMEDIATE (serialised, with a busy
timeout); on PostgreSQL rows are locked with FOR UPDATE, and queue claims skip
rows other workers hold (SKIP LOCKED). Timestamps are timezone-aware UTC; `now`
defaults to the current time so tests can pass a fixed clock.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.completeness import InstanceFacts, study_wholeness
from db.engine import begin_write, is_postgres
from db.models import (
    AuditEvent,
    Delivery,
    IngestRejection,
    Instance,
    Job,
    Result,
    ResultObject,
    Series,
    Study,
)
from db.states import DeliveryState, JobState, StudyState
from db.types import (
    BundleRef,
    DeliverySummary,
    DeliveryTicket,
    InstanceRecord,
    JobOutcome,
    JobSummary,
    JobTicket,
    OutputObject,
    RecordOutcome,
    ResultSummaryRow,
    RetryPolicy,
    SeriesSummary,
    StudyDetail,
    StudyFilters,
    StudyNotFound,
    StudyRow,
)

logger = logging.getLogger(__name__)

DEFAULT_JOB_MAX_ATTEMPTS = 3
SYSTEM_ACTOR = "system"
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT)
IMAGE_MODALITIES = frozenset({"CT", "MR"})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _clock(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if not isinstance(now, datetime):
        raise TypeError(f"now: expected a datetime, got {type(now).__name__}")
    if now.tzinfo is None:
        raise ValueError("now: must be timezone-aware (UTC)")
    return now


def _end_read(session: Session) -> None:
    # Release the read snapshot (SQLite WAL readers otherwise pin old pages).
    session.commit()


def _insert_ignore(session: Session, model: type, values: dict[str, Any], conflict: Sequence[str]) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING; returns the new id, or None when the row existed."""
    table = model.__table__  # type: ignore[attr-defined]
    dialect_insert = postgresql.insert if is_postgres(session) else sqlite.insert
    # Values go in as parameters so the compiled statement is cached across calls.
    stmt = dialect_insert(table).on_conflict_do_nothing(index_elements=list(conflict)).returning(table.c.id)
    return session.execute(stmt, values).scalar_one_or_none()


def _locked(stmt: Select[Any], skip_locked: bool = False, of: Any = None) -> Select[Any]:
    """Row-lock for update and refresh the identity map.

    PostgreSQL: FOR NO KEY UPDATE, which does not block the KEY SHARE locks that
    foreign-key inserts take (audit events, results), so those cannot deadlock with
    it. Lock order everywhere: study, then its jobs, then results and deliveries.
    SQLite ignores it; its BEGIN IMMEDIATE already serialises writers.
    """
    return stmt.with_for_update(skip_locked=skip_locked, of=of, key_share=True).execution_options(
        populate_existing=True
    )


def _add_audit(
    session: Session,
    actor: str,
    action: str,
    now: datetime,
    study_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(at=now, actor=actor, action=action, study_id=study_id, detail=detail or {})
    session.add(event)
    return event


# --------------------------------------------------------------------------- ingest


def record_instance(session: Session, rec: InstanceRecord, now: datetime | None = None) -> RecordOutcome:
    """Store one received instance (commits). Idempotent on SOP Instance UID.

    A new instance in a complete study reopens it (generation + 1) unless the
    instance is one of our own result objects echoed back by the PACS.
    A duplicate only refreshes path and size.
    """
    now = _clock(now)
    begin_write(session)
    try:
        study = _upsert_study(session, rec, now)
        series_id = _upsert_series(session, rec, study.id)
        instance_id = _insert_ignore(
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
    by_uid = _locked(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
    study = session.execute(by_uid).scalar_one_or_none()
    if study is not None:
        return study
    _insert_ignore(
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
    _insert_ignore(
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
    _add_audit(
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
    now = _clock(now)
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


# --------------------------------------------------------------------------- completeness


def sweep_completeness(
    session: Session,
    now: datetime | None,
    quiet_period_s: float,
    whole_quiet_s: float,
    bundles: Sequence[BundleRef],
    max_attempts: int = DEFAULT_JOB_MAX_ATTEMPTS,
) -> list[int]:
    """Complete the receiving studies that are ready and enqueue their jobs.

    Ready: quiet for `quiet_period_s`, or quiet for `whole_quiet_s` and whole by
    content (`db.completeness.study_wholeness`). One transaction per study.
    Returns the ids of the studies completed.
    """
    now = _clock(now)
    horizon = now - timedelta(seconds=min(quiet_period_s, whole_quiet_s))
    candidate_ids = session.execute(
        select(Study.id)
        .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= horizon)
        .order_by(Study.last_received_at, Study.id)
    ).scalars().all()
    _end_read(session)
    completed = []
    for study_id in candidate_ids:
        if _complete_if_ready(session, study_id, now, quiet_period_s, whole_quiet_s, bundles, max_attempts):
            completed.append(study_id)
    return completed


def _complete_if_ready(
    session: Session,
    study_id: int,
    now: datetime,
    quiet_period_s: float,
    whole_quiet_s: float,
    bundles: Sequence[BundleRef],
    max_attempts: int,
) -> bool:
    begin_write(session)
    try:
        study = session.execute(_locked(select(Study).where(Study.id == study_id))).scalar_one()
        reason = _readiness(session, study, now, quiet_period_s, whole_quiet_s)
        if reason is None:
            session.rollback()
            return False
        study.state = StudyState.COMPLETE
        study.completed_at = now
        _supersede_older_jobs(session, study)
        job_ids = _enqueue_jobs(session, study, bundles, now, max_attempts, SYSTEM_ACTOR)
        log_extra = {
            "action": "study_complete",
            "study_uid": study.study_instance_uid,
            "reason": reason,
            "generation": study.generation,
            "jobs": len(job_ids),
        }
        _add_audit(
            session,
            SYSTEM_ACTOR,
            "study_complete",
            now,
            study.id,
            {"reason": reason, "generation": study.generation, "job_ids": job_ids},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info("study complete", extra=log_extra)
    return True


def _readiness(
    session: Session, study: Study, now: datetime, quiet_period_s: float, whole_quiet_s: float
) -> str | None:
    if study.state != StudyState.RECEIVING:
        return None
    quiet_s = (now - study.last_received_at).total_seconds()
    if quiet_s >= quiet_period_s:
        return "quiet period elapsed"
    if quiet_s < whole_quiet_s:
        return None
    verdict = study_wholeness(list(_instance_facts(session, study.id).values()))
    return "whole by content" if verdict.whole else None


def _instance_facts(session: Session, study_id: int) -> dict[int, list[InstanceFacts]]:
    rows = session.execute(
        select(
            Instance.series_id,
            Instance.instance_number,
            Instance.slice_position,
            Instance.images_in_acquisition,
            Instance.number_of_frames,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id)
    ).all()
    facts: dict[int, list[InstanceFacts]] = defaultdict(list)
    for series_id, number, position, in_acquisition, frames in rows:
        facts[series_id].append(InstanceFacts(number, position, in_acquisition, frames))
    return facts


def _supersede_older_jobs(session: Session, study: Study) -> int:
    return session.execute(
        update(Job)
        .where(Job.study_id == study.id, Job.generation < study.generation, Job.state.in_(ACTIVE_JOB_STATES))
        .values(state=JobState.SUPERSEDED, lease_expires_at=None)
    ).rowcount


def _study_modalities(session: Session, study: Study) -> set[str]:
    found = session.execute(
        select(Series.modality).where(Series.study_id == study.id).distinct()
    ).scalars().all()
    return {m for m in [*found, study.modality] if m}


def _enqueue_jobs(
    session: Session,
    study: Study,
    bundles: Sequence[BundleRef],
    now: datetime,
    max_attempts: int,
    actor: str,
) -> list[int]:
    modalities = _study_modalities(session, study)
    matching = [b for b in bundles if b.modality in modalities]
    if not matching:
        _add_audit(
            session,
            actor,
            "no_job_enqueued",
            now,
            study.id,
            {
                "reason": "no model bundle for the study's modalities",
                "modalities": sorted(modalities),
                "bundle_modalities": sorted({b.modality for b in bundles}),
            },
        )
        return []
    jobs = [
        Job(
            study_id=study.id,
            bundle_name=bundle.name,
            bundle_version=bundle.version,
            generation=study.generation,
            state=JobState.QUEUED,
            attempts=0,
            max_attempts=max_attempts,
            created_at=now,
            available_at=now,
        )
        for bundle in matching
    ]
    session.add_all(jobs)
    session.flush()
    return [job.id for job in jobs]


# --------------------------------------------------------------------------- jobs


def claim_job(session: Session, worker_id: str, lease_s: float, now: datetime | None = None) -> JobTicket | None:
    """Claim the oldest available queued job under a lease (commits); None when idle."""
    now = _clock(now)
    begin_write(session)
    try:
        candidate = (
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.available_at <= now)
            .order_by(Job.available_at, Job.id)
            .limit(1)
        )
        if is_postgres(session):
            candidate = candidate.with_for_update(skip_locked=True, key_share=True)
        job_id = session.execute(candidate).scalar_one_or_none()
        if job_id is None:
            session.commit()
            return None
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s),
                heartbeat_at=now,
                started_at=now,
            )
        ).rowcount
        if claimed != 1:
            session.rollback()
            return None
        job, study_uid = session.execute(
            select(Job, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_id)
            .where(Job.id == job_id)
            .execution_options(populate_existing=True)
        ).one()
        ticket = JobTicket(
            job_id=job.id,
            study_id=job.study_id,
            study_instance_uid=study_uid,
            bundle_name=job.bundle_name,
            bundle_version=job.bundle_version,
            generation=job.generation,
            attempt=job.attempts,
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info(
        "job claimed",
        extra={"action": "job_claimed", "job_id": ticket.job_id, "worker_id": worker_id, "attempt": ticket.attempt},
    )
    return ticket


def heartbeat(session: Session, job_id: int, worker_id: str, lease_s: float, now: datetime | None = None) -> bool:
    """Extend the lease (commits). False when the job is no longer running under this worker
    (requeued, superseded, finished); the worker should then abandon it. A lease that
    expired but was not yet taken back is still renewed: nobody else holds the job."""
    now = _clock(now)
    begin_write(session)
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
    ).rowcount
    session.commit()
    if not renewed:
        logger.warning("lease lost", extra={"action": "lease_lost", "job_id": job_id, "worker_id": worker_id})
    return renewed == 1


def _fenced_job(session: Session, job_id: int, worker_id: str, lock_study: bool = False) -> Job | None:
    if lock_study:
        # Study before job: the order sweep_completeness and requeue_study use.
        study_id = session.execute(select(Job.study_id).where(Job.id == job_id)).scalar_one_or_none()
        if study_id is None:
            return None
        session.execute(_locked(select(Study.id).where(Study.id == study_id))).scalar_one()
    job = session.execute(_locked(select(Job).where(Job.id == job_id))).scalar_one_or_none()
    if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
        return None
    return job


def finish_job(
    session: Session,
    job_id: int,
    worker_id: str,
    outcome: JobOutcome,
    destinations: Sequence[str],
    now: datetime | None = None,
) -> int | None:
    """Record the job's result, its objects and their deliveries; mark the job done.

    Fenced: only while the job is running under `worker_id`; otherwise nothing
    changes and None is returned. One transaction (commits). Returns the result id.
    """
    now = _clock(now)
    begin_write(session)
    try:
        # The study lock also keeps two results of one study+bundle from both staying current.
        job = _fenced_job(session, job_id, worker_id, lock_study=True)
        if job is None:
            session.rollback()
            logger.warning(
                "result discarded: job not held by this worker",
                extra={"action": "finish_fenced", "job_id": job_id, "worker_id": worker_id},
            )
            return None
        previous = _supersede_previous_results(session, job)
        result = _new_result(job, outcome, now, previous)
        session.add(result)
        session.flush()
        _add_objects_and_deliveries(session, result, outcome.objects, destinations, now)
        job.state = JobState.DONE
        job.finished_at = now
        job.lease_expires_at = None
        job.last_error = None
        _add_audit(
            session,
            SYSTEM_ACTOR,
            "result_recorded",
            now,
            job.study_id,
            {
                "job_id": job.id,
                "result_id": result.id,
                "bundle": f"{job.bundle_name}-{job.bundle_version}",
                "supersedes_result_id": previous,
                "objects": len(outcome.objects),
            },
        )
        result_id = result.id
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info(
        "job done",
        extra={"action": "job_done", "job_id": job_id, "result_id": result_id, "supersedes": previous},
    )
    return result_id


def _supersede_previous_results(session: Session, job: Job) -> int | None:
    previous = session.execute(
        _locked(
            select(Result)
            .where(Result.study_id == job.study_id, Result.bundle_name == job.bundle_name, Result.superseded.is_(False))
            .order_by(Result.id.desc())
        )
    ).scalars().all()
    for result in previous:
        result.superseded = True
    return previous[0].id if previous else None


def _new_result(job: Job, outcome: JobOutcome, now: datetime, previous_id: int | None) -> Result:
    return Result(
        job_id=job.id,
        study_id=job.study_id,
        bundle_name=job.bundle_name,
        bundle_version=job.bundle_version,
        eligible=outcome.eligible,
        ineligible_reason=outcome.ineligible_reason,
        anomaly_score=outcome.anomaly_score,
        percentile=outcome.percentile,
        screen_positive=outcome.screen_positive,
        threshold=outcome.threshold,
        predicted_age=outcome.predicted_age,
        chronological_age=outcome.chronological_age,
        age_gap=outcome.age_gap,
        qc_failed=bool(outcome.qc_reasons) or not outcome.eligible,
        qc_reasons=list(outcome.qc_reasons),
        qc_metrics=dict(outcome.qc_metrics),
        selected_series_uid=outcome.selected_series_uid,
        series_verdicts=list(outcome.series_verdicts),
        timings=dict(outcome.timings),
        created_at=now,
        supersedes_result_id=previous_id,
        superseded=False,
    )


def _add_objects_and_deliveries(
    session: Session,
    result: Result,
    objects: Iterable[OutputObject],
    destinations: Sequence[str],
    now: datetime,
) -> None:
    unique_destinations = list(dict.fromkeys(destinations))
    for obj in objects:
        row = ResultObject(
            result_id=result.id,
            sop_instance_uid=obj.sop_instance_uid,
            sop_class_uid=obj.sop_class_uid,
            kind=obj.kind,
            path=obj.path,
        )
        session.add(row)
        session.flush()
        session.add_all(
            Delivery(
                result_object_id=row.id,
                destination=destination,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
            )
            for destination in unique_destinations
        )
    session.flush()


def fail_job(
    session: Session,
    job_id: int,
    worker_id: str,
    reason: str,
    retryable: bool,
    now: datetime | None = None,
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
) -> JobState | None:
    """Record a failed attempt (commits), fenced like `finish_job` (None when not held).

    Retryable and attempts below min(job.max_attempts, policy.max_attempts): queued
    again after the policy's backoff. Otherwise failed, with the reason kept.
    """
    now = _clock(now)
    policy = policy or RetryPolicy()
    begin_write(session)
    try:
        job = _fenced_job(session, job_id, worker_id)
        if job is None:
            session.rollback()
            return None
        limit = min(job.max_attempts, policy.max_attempts)
        job.last_error = reason
        job.lease_owner = None
        job.lease_expires_at = None
        if retryable and job.attempts < limit:
            delay_s = policy.delay(job.attempts, rng)
            job.state = JobState.QUEUED
            job.available_at = now + timedelta(seconds=delay_s)
        else:
            job.state = JobState.FAILED
            job.finished_at = now
            _add_audit(
                session,
                SYSTEM_ACTOR,
                "job_failed",
                now,
                job.study_id,
                {"job_id": job.id, "attempts": job.attempts, "retryable": retryable, "reason": reason},
            )
        state = job.state
        attempts = job.attempts
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.warning(
        "job attempt failed",
        extra={"action": "job_failed", "job_id": job_id, "state": str(state), "attempts": attempts},
    )
    return state


def requeue_expired(session: Session, now: datetime | None = None) -> int:
    """Running jobs whose lease expired: queued again, or failed when out of attempts (commits)."""
    now = _clock(now)
    begin_write(session)
    try:
        stmt = select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        expired = session.execute(_locked(stmt, skip_locked=is_postgres(session))).scalars().all()
        for job in expired:
            job.last_error = f"lease expired (worker {job.lease_owner}, attempt {job.attempts})"
            job.lease_owner = None
            job.lease_expires_at = None
            if job.attempts >= job.max_attempts:
                job.state = JobState.FAILED
                job.finished_at = now
                _add_audit(
                    session, SYSTEM_ACTOR, "job_failed", now, job.study_id,
                    {"job_id": job.id, "attempts": job.attempts, "reason": job.last_error},
                )
            else:
                job.state = JobState.QUEUED
                job.available_at = now
        count = len(expired)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if count:
        logger.warning("expired leases recovered", extra={"action": "requeue_expired", "jobs": count})
    return count


# --------------------------------------------------------------------------- deliveries


def claim_deliveries(
    session: Session,
    now: datetime | None,
    limit: int,
    lease_s: float,
    destination: str | None = None,
    result_id: int | None = None,
) -> list[DeliveryTicket]:
    """Claim due deliveries (pending and due, or in flight with an expired lease) (commits)."""
    now = _clock(now)
    begin_write(session)
    try:
        due = or_(
            and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
            and_(Delivery.state == DeliveryState.IN_FLIGHT, Delivery.lease_expires_at < now),
        )
        stmt = (
            select(Delivery.id)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .where(due)
            .order_by(Delivery.next_attempt_at, Delivery.result_object_id, Delivery.id)
            .limit(limit)
        )
        if destination is not None:
            stmt = stmt.where(Delivery.destination == destination)
        if result_id is not None:
            stmt = stmt.where(ResultObject.result_id == result_id)
        if is_postgres(session):
            stmt = stmt.with_for_update(skip_locked=True, of=Delivery, key_share=True)
        ids = session.execute(stmt).scalars().all()
        if not ids:
            session.commit()
            return []
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                state=DeliveryState.IN_FLIGHT,
                attempts=Delivery.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_s),
            )
        )
        rows = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.attempts, ResultObject)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .where(Delivery.id.in_(ids))
            .order_by(Delivery.next_attempt_at, Delivery.result_object_id, Delivery.id)
        ).all()
        tickets = [
            DeliveryTicket(
                delivery_id=delivery_id,
                destination=dest,
                path=obj.path,
                sop_instance_uid=obj.sop_instance_uid,
                attempt=attempts,
                result_id=obj.result_id,
            )
            for delivery_id, dest, attempts, obj in rows
        ]
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return tickets


def mark_delivered(session: Session, delivery_id: int, status: int, now: datetime | None = None) -> bool:
    """In flight -> delivered (commits). False when the delivery was not in flight."""
    now = _clock(now)
    begin_write(session)
    changed = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.IN_FLIGHT)
        .values(
            state=DeliveryState.DELIVERED,
            delivered_at=now,
            last_status=status,
            last_error=None,
            lease_expires_at=None,
        )
    ).rowcount
    session.commit()
    if changed:
        logger.info("delivered", extra={"action": "delivered", "delivery_id": delivery_id, "status": status})
    else:
        logger.warning(
            "delivery was not in flight; left unchanged",
            extra={"action": "delivered_ignored", "delivery_id": delivery_id},
        )
    return changed == 1


def mark_delivery_failed(
    session: Session,
    delivery_id: int,
    error: str,
    status: int | None = None,
    policy: RetryPolicy | None = None,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> DeliveryState:
    """A failed send (commits): pending again after backoff, or dead after policy.max_attempts.

    A delivery that is not in flight is left unchanged and its state returned.
    """
    if isinstance(status, RetryPolicy):
        raise TypeError("status: expected an int DICOM status or None, got a RetryPolicy (pass policy=...)")
    now = _clock(now)
    policy = policy or RetryPolicy()
    begin_write(session)
    try:
        delivery = session.execute(_locked(select(Delivery).where(Delivery.id == delivery_id))).scalar_one()
        if delivery.state != DeliveryState.IN_FLIGHT:
            state = delivery.state
            session.rollback()
            return state
        delivery.last_error = error
        delivery.last_status = status
        delivery.lease_expires_at = None
        if delivery.attempts >= policy.max_attempts:
            delivery.state = DeliveryState.DEAD
        else:
            delivery.state = DeliveryState.PENDING
            delivery.next_attempt_at = now + timedelta(seconds=policy.delay(delivery.attempts, rng))
        state = delivery.state
        attempts = delivery.attempts
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.warning(
        "delivery failed",
        extra={"action": "delivery_failed", "delivery_id": delivery_id, "state": str(state), "attempts": attempts},
    )
    return state


def resend_dead(
    session: Session,
    actor: str,
    study_instance_uid: str | None = None,
    delivery_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Dead deliveries -> pending with attempts reset (commits, audited). No filter: all dead."""
    now = _clock(now)
    begin_write(session)
    try:
        stmt = (
            select(Delivery, Result.study_id)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .join(Result, Result.id == ResultObject.result_id)
            .where(Delivery.state == DeliveryState.DEAD)
        )
        if study_instance_uid is not None:
            stmt = stmt.join(Study, Study.id == Result.study_id).where(Study.study_instance_uid == study_instance_uid)
        if delivery_ids is not None:
            stmt = stmt.where(Delivery.id.in_(list(delivery_ids)))
        rows = session.execute(_locked(stmt, of=Delivery)).all()
        by_study: dict[int, list[int]] = defaultdict(list)
        for delivery, study_id in rows:
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = now
            by_study[study_id].append(delivery.id)
        for study_id, ids in by_study.items():
            _add_audit(session, actor, "resend_dead", now, study_id, {"delivery_ids": sorted(ids)})
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info("dead deliveries re-sent", extra={"action": "resend_dead", "actor": actor, "deliveries": len(rows)})
    return len(rows)


# --------------------------------------------------------------------------- review


def audit(
    session: Session,
    actor: str,
    action: str,
    study_id: int | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> int:
    """Append an audit event (commits); returns its id."""
    now = _clock(now)
    begin_write(session)
    event = _add_audit(session, actor, action, now, study_id, detail)
    session.commit()
    return event.id


def _study_by_uid(session: Session, study_uid: str, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.study_instance_uid == study_uid)
    study = session.execute(_locked(stmt) if lock else stmt).scalar_one_or_none()
    if study is None:
        raise StudyNotFound(f"no study with Study Instance UID {study_uid}")
    return study


def set_flag(
    session: Session,
    study_uid: str,
    flagged: bool,
    comment: str | None,
    actor: str,
    now: datetime | None = None,
) -> None:
    """Flag or unflag a study for review (commits, audited). Raises StudyNotFound."""
    now = _clock(now)
    begin_write(session)
    try:
        study = _study_by_uid(session, study_uid, lock=True)
        study.flagged = flagged
        study.flag_comment = comment
        _add_audit(session, actor, "flag_set" if flagged else "flag_cleared", now, study.id, {"comment": comment})
        session.commit()
    except BaseException:
        session.rollback()
        raise


def set_review(
    session: Session,
    study_uid: str,
    reviewed: bool,
    confirmed_normal: bool,
    actor: str,
    now: datetime | None = None,
) -> None:
    """Record an admin's review of a study (commits, audited). Raises StudyNotFound."""
    now = _clock(now)
    begin_write(session)
    try:
        study = _study_by_uid(session, study_uid, lock=True)
        study.reviewed = reviewed
        study.confirmed_normal = confirmed_normal
        _add_audit(
            session, actor, "review_set", now, study.id,
            {"reviewed": reviewed, "confirmed_normal": confirmed_normal},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise


def requeue_study(
    session: Session,
    study_uid: str,
    actor: str,
    bundles: Sequence[BundleRef],
    now: datetime | None = None,
    max_attempts: int = DEFAULT_JOB_MAX_ATTEMPTS,
) -> list[int]:
    """Run the study again with the matching bundles (commits, audited); returns new job ids.

    Queued or running jobs of the study are superseded. A study still receiving is
    completed now (force-complete). Raises StudyNotFound.
    """
    now = _clock(now)
    begin_write(session)
    try:
        study = _study_by_uid(session, study_uid, lock=True)
        forced = study.state == StudyState.RECEIVING
        if forced:
            study.state = StudyState.COMPLETE
            study.completed_at = now
        session.execute(
            update(Job)
            .where(Job.study_id == study.id, Job.state.in_(ACTIVE_JOB_STATES))
            .values(state=JobState.SUPERSEDED, lease_expires_at=None)
        )
        job_ids = _enqueue_jobs(session, study, bundles, now, max_attempts, actor)
        _add_audit(session, actor, "study_requeued", now, study.id, {"job_ids": job_ids, "force_completed": forced})
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info("study requeued", extra={"action": "study_requeued", "study_uid": study_uid, "jobs": len(job_ids)})
    return job_ids


def _latest_result_id():  # type: ignore[no-untyped-def]
    return (
        select(func.max(Result.id))
        .where(Result.study_id == Study.id, Result.superseded.is_(False))
        .correlate(Study)
        .scalar_subquery()
    )


def _instance_count():  # type: ignore[no-untyped-def]
    return (
        select(func.coalesce(func.sum(Series.instance_count), 0))
        .where(Series.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )


def _study_rows_query() -> Select[Any]:
    return (
        select(Study, Result, _instance_count().label("instance_count"))
        .outerjoin(Result, Result.id == _latest_result_id())
    )


def _apply_filters(stmt: Select[Any], filters: StudyFilters) -> Select[Any]:
    if filters.state is not None:
        stmt = stmt.where(Study.state == StudyState(filters.state))
    if filters.modality is not None:
        stmt = stmt.where(Study.modality == filters.modality)
    if filters.outliers_only:
        stmt = stmt.where(Result.screen_positive.is_(True))
    if filters.qc_failed_only:
        stmt = stmt.where(Result.qc_failed.is_(True))
    if filters.flagged is not None:
        stmt = stmt.where(Study.flagged.is_(filters.flagged))
    if filters.min_percentile is not None:
        stmt = stmt.where(Result.percentile >= filters.min_percentile)
    return stmt


def _job_summaries(session: Session, study_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    if not study_ids:
        return {}
    rows = session.execute(
        select(Job.study_id, Job.state, func.count())
        .where(Job.study_id.in_(list(study_ids)))
        .group_by(Job.study_id, Job.state)
    ).all()
    summary: dict[int, dict[str, int]] = defaultdict(dict)
    for study_id, state, count in rows:
        summary[study_id][str(state)] = count
    return summary


def _to_row(study: Study, result: Result | None, instance_count: int, jobs: dict[str, int]) -> StudyRow:
    row = StudyRow(
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        modality=study.modality,
        state=str(study.state),
        generation=study.generation,
        instance_count=int(instance_count),
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        completed_at=study.completed_at,
        jobs=jobs,
        flagged=study.flagged,
        flag_comment=study.flag_comment,
    )
    if result is None:
        return row
    return replace(
        row,
        result_id=result.id,
        bundle_name=result.bundle_name,
        bundle_version=result.bundle_version,
        eligible=result.eligible,
        anomaly_score=result.anomaly_score,
        percentile=result.percentile,
        screen_positive=result.screen_positive,
        predicted_age=result.predicted_age,
        chronological_age=result.chronological_age,
        age_gap=result.age_gap,
        qc_reasons=list(result.qc_reasons),
    )


def list_studies(session: Session, filters: StudyFilters | None = None) -> list[StudyRow]:
    """Studies, newest arrivals first, with their latest current result (read-only)."""
    filters = filters or StudyFilters()
    stmt = (
        _apply_filters(_study_rows_query(), filters)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(filters.limit)
        .offset(filters.offset)
    )
    rows = session.execute(stmt).all()
    jobs = _job_summaries(session, [study.id for study, _, _ in rows])
    out = [_to_row(study, result, count, jobs.get(study.id, {})) for study, result, count in rows]
    _end_read(session)
    return out


def get_study(session: Session, study_uid: str) -> StudyDetail | None:
    """Everything about one study for the admin view (read-only); None when unknown."""
    found = session.execute(
        _study_rows_query().where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    if found is None:
        _end_read(session)
        return None
    study, latest, count = found
    detail = StudyDetail(
        row=_to_row(study, latest, count, _job_summaries(session, [study.id]).get(study.id, {})),
        study_date=study.study_date,
        patient_age=study.patient_age,
        station_name=study.station_name,
        institution=study.institution,
        calling_ae=study.calling_ae,
        reviewed=study.reviewed,
        confirmed_normal=study.confirmed_normal,
        series=_series_of(session, study.id),
        jobs=_jobs_of(session, study.id),
        results=_results_of(session, study.id),
        deliveries=_deliveries_of(session, study.id),
    )
    _end_read(session)
    return detail


def _series_of(session: Session, study_id: int) -> list[SeriesSummary]:
    rows = session.execute(
        select(Series).where(Series.study_id == study_id).order_by(Series.series_number, Series.id)
    ).scalars()
    return [
        SeriesSummary(s.series_instance_uid, s.modality, s.series_number, s.series_description, s.instance_count)
        for s in rows
    ]


def _jobs_of(session: Session, study_id: int) -> list[JobSummary]:
    rows = session.execute(select(Job).where(Job.study_id == study_id).order_by(Job.id)).scalars()
    return [
        JobSummary(
            j.id, j.bundle_name, j.bundle_version, j.generation, str(j.state),
            j.attempts, j.last_error, j.created_at, j.finished_at,
        )
        for j in rows
    ]


def _results_of(session: Session, study_id: int) -> list[ResultSummaryRow]:
    rows = session.execute(select(Result).where(Result.study_id == study_id).order_by(Result.id)).scalars()
    return [
        ResultSummaryRow(
            result_id=r.id,
            job_id=r.job_id,
            bundle_name=r.bundle_name,
            bundle_version=r.bundle_version,
            eligible=r.eligible,
            ineligible_reason=r.ineligible_reason,
            anomaly_score=r.anomaly_score,
            percentile=r.percentile,
            screen_positive=r.screen_positive,
            threshold=r.threshold,
            predicted_age=r.predicted_age,
            chronological_age=r.chronological_age,
            age_gap=r.age_gap,
            qc_reasons=list(r.qc_reasons),
            qc_metrics=dict(r.qc_metrics),
            selected_series_uid=r.selected_series_uid,
            series_verdicts=list(r.series_verdicts),
            timings=dict(r.timings),
            created_at=r.created_at,
            superseded=r.superseded,
            supersedes_result_id=r.supersedes_result_id,
        )
        for r in rows
    ]


def _deliveries_of(session: Session, study_id: int) -> list[DeliverySummary]:
    rows = session.execute(
        select(Delivery, ResultObject)
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .join(Result, Result.id == ResultObject.result_id)
        .where(Result.study_id == study_id)
        .order_by(Delivery.id)
    ).all()
    return [
        DeliverySummary(
            d.id, o.result_id, o.sop_instance_uid, str(o.kind), d.destination, str(d.state),
            d.attempts, d.last_error, d.last_status, d.delivered_at,
        )
        for d, o in rows
    ]


# --------------------------------------------------------------------------- worker and housekeeping


def study_instances(session: Session, study_id: int) -> dict[str, list[tuple[str, str]]]:
    """Series UID -> [(relative path, SOP Instance UID)] for the worker (read-only)."""
    rows = session.execute(
        select(Series.series_instance_uid, Instance.path, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.id, Instance.instance_number, Instance.slice_position, Instance.id)
    ).all()
    _end_read(session)
    grouped: dict[str, list[tuple[str, str]]] = {}
    for series_uid, path, sop_uid in rows:
        grouped.setdefault(series_uid, []).append((path, sop_uid))
    return grouped


def get_result_objects(session: Session, result_id: int) -> list[OutputObject]:
    rows = session.execute(
        select(ResultObject).where(ResultObject.result_id == result_id).order_by(ResultObject.id)
    ).scalars().all()
    out = [OutputObject(o.sop_instance_uid, o.sop_class_uid, str(o.kind), o.path) for o in rows]
    _end_read(session)
    return out


def retention_candidates(session: Session, older_than: datetime) -> list[tuple[int, str]]:
    """(study id, uid) of complete studies finished before `older_than` with nothing left to do
    (no active job, no open delivery) whose instances are not yet purged (read-only)."""
    older_than = _clock(older_than)
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
    _end_read(session)
    return [(study_id, uid) for study_id, uid in rows]


def mark_purged(session: Session, study_id: int, actor: str = SYSTEM_ACTOR, now: datetime | None = None) -> int:
    """Delete the study's instance rows, keeping study, results and audit (commits, audited).

    The caller deletes the files. Returns the number of instance rows deleted.
    """
    now = _clock(now)
    begin_write(session)
    try:
        study = session.execute(_locked(select(Study).where(Study.id == study_id))).scalar_one_or_none()
        if study is None:
            raise StudyNotFound(f"no study with id {study_id}")
        series_ids = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
        deleted = session.execute(
            Instance.__table__.delete().where(Instance.series_id.in_(series_ids))
        ).rowcount
        session.execute(update(Series).where(Series.study_id == study_id).values(instance_count=0))
        study.purged_at = now
        _add_audit(session, actor, "study_purged", now, study_id, {"instances": deleted})
        session.commit()
    except BaseException:
        session.rollback()
        raise
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
        found = dict(session.execute(select(model.state, func.count()).group_by(model.state)).all())
        out[name] = {str(state): int(found.get(state, 0)) for state in states}
    _end_read(session)
    return out
