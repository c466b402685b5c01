"""The job queue: claim under a lease, heartbeat, finish or fail (fenced), recover expired leases."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from headscreen.db import blobs as stored_blobs
from headscreen.db.engine import begin_write, is_postgres, write_transaction
from headscreen.db.models import RESULT_FIGURES, Delivery, Job, RescreenRun, Result, ResultObject, Study
from headscreen.db.states import DeliveryState, JobState, ObjectKind
from headscreen.db.txn import SYSTEM_ACTOR, add_audit, clock, end_read, execute_counted, locked
from headscreen.db.types import CurrentResult, JobOutcome, JobTicket, OutputObject, RejectionNote, RetryPolicy
from headscreen.figures import figures_of
from headscreen.privacy import scrub

logger = logging.getLogger(__name__)


def claim_job(session: Session, worker_id: str, lease_s: float, now: datetime | None = None) -> JobTicket | None:
    """Claim an available queued job under a lease (commits); None when idle. The most
    urgent first (lowest `priority`: live studies before archive re-screening), then the oldest."""
    now = clock(now)
    begin_write(session)
    try:
        candidate = (
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.available_at <= now)
            .order_by(Job.priority, Job.available_at, Job.id)
            .limit(1)
        )
        if is_postgres(session):
            candidate = candidate.with_for_update(skip_locked=True, key_share=True)
        job_id = session.execute(candidate).scalar_one_or_none()
        if job_id is None:
            session.commit()
            return None
        claimed = execute_counted(
            session,
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
        )
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
    expired but was not yet taken back is still renewed: nobody else holds the job.
    Warns "lease lost" unless the job is done by this very worker."""
    now = clock(now)
    begin_write(session)
    renewed = execute_counted(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
    )
    session.commit()
    if renewed:
        return True
    if _finished_by(session, job_id, worker_id):
        # A renewal that raced our own finish_job: the lease ended because we were done, not lost.
        logger.debug("heartbeat after finishing", extra={"job_id": job_id, "worker_id": worker_id})
        return False
    logger.warning("lease lost", extra={"action": "lease_lost", "job_id": job_id, "worker_id": worker_id})
    return False


def _finished_by(session: Session, job_id: int, worker_id: str) -> bool:
    row = session.execute(select(Job.state, Job.lease_owner).where(Job.id == job_id)).one_or_none()
    end_read(session)
    return row is not None and row.state == JobState.DONE and row.lease_owner == worker_id


def _fenced_job(session: Session, job_id: int, worker_id: str, lock_study: bool = False) -> Job | None:
    if lock_study:
        # Study before job: the order sweep_completeness and requeue_study use.
        study_id = session.execute(select(Job.study_id).where(Job.id == job_id)).scalar_one_or_none()
        if study_id is None:
            return None
        session.execute(locked(select(Study.id).where(Study.id == study_id))).scalar_one()
    job = session.execute(locked(select(Job).where(Job.id == job_id))).scalar_one_or_none()
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
    rejection: RejectionNote | None = None,
    blobs: Sequence[tuple[str, bytes]] = (),
) -> int | None:
    """Record the job's result, its objects and their deliveries; mark the job done.

    Fenced: only while the job is running under `worker_id`; otherwise nothing
    changes and None is returned. One transaction (commits). Returns the result id.
    `rejection` is the IOCM rejection note of the results this one supersedes, if any
    (see RejectionNote); `claim_deliveries` holds it back until it may go out.
    `blobs` (the PostgreSQL storage backend): the objects' bytes by key, stored in the same
    transaction (db.blobs), so a fenced-off result leaves none behind.
    """
    now = clock(now)
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
        if job.rescreen_run_id is not None and session.execute(
                select(RescreenRun.record_only).where(RescreenRun.id == job.rescreen_run_id)).scalar_one():
            destinations, rejection = [], None  # `rescreen --record-only`: stored, never sent
        superseded = _supersede_previous_results(session, job)
        previous = superseded[0] if superseded else None
        result = _new_result(job, outcome, now, previous)
        session.add(result)
        session.flush()
        _add_objects_and_deliveries(session, result, outcome.objects, destinations, now)
        note = _add_rejection_note(session, result, rejection, superseded, now)
        if blobs:
            study_uid = job.study.study_instance_uid
            stored_blobs.put(session, stored_blobs.RESULT, [(key, study_uid, data) for key, data in blobs], now)
        job.state = JobState.DONE
        job.finished_at = now
        job.lease_expires_at = None
        job.last_error = None
        add_audit(
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
                **note,
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


def _supersede_previous_results(session: Session, job: Job) -> list[int]:
    """Mark the study's current results of this bundle superseded; their ids, newest first."""
    previous = session.execute(
        locked(
            select(Result)
            .where(Result.study_id == job.study_id, Result.bundle_name == job.bundle_name, Result.superseded.is_(False))
            .order_by(Result.id.desc())
        )
    ).scalars().all()
    for result in previous:
        result.superseded = True
    return [result.id for result in previous]


def current_results(session: Session, study_id: int, bundle_name: str) -> list[CurrentResult]:
    """The results of the study and bundle a new result would supersede now, newest first,
    with their objects and destinations: what its rejection note lists (read-only)."""
    ids = session.execute(
        select(Result.id)
        .where(Result.study_id == study_id, Result.bundle_name == bundle_name, Result.superseded.is_(False))
        .order_by(Result.id.desc())
    ).scalars().all()
    found = []
    for result_id in ids:
        rows = session.execute(
            select(ResultObject)
            .where(ResultObject.result_id == result_id, ResultObject.kind != ObjectKind.KOS)
            .order_by(ResultObject.id)
        ).scalars().all()
        destinations = session.execute(
            select(Delivery.destination).distinct()
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .where(ResultObject.result_id == result_id, ResultObject.kind != ObjectKind.KOS)
            .order_by(Delivery.destination)
        ).scalars().all()
        found.append(CurrentResult(
            result_id, [OutputObject(o.sop_instance_uid, o.sop_class_uid, str(o.kind), o.path) for o in rows],
            list(destinations)))
    end_read(session)
    return found


def _add_rejection_note(
    session: Session, result: Result, note: RejectionNote | None, superseded: list[int], now: datetime,
) -> dict[str, object]:
    """Record the rejection note as one more object of the new result, with a delivery to each
    wanted destination that the superseded results were sent to. For the audit: what was done."""
    if note is None:
        return {}
    obj = note.object
    if obj.kind != ObjectKind.KOS:
        raise ValueError(f"finish_job: argument 'rejection' holds a {obj.kind!r} object, not a rejection note")
    if not superseded or set(note.rejects_result_ids) != set(superseded):
        # Another result of the study finished since the note was built: it lists the wrong ones.
        logger.warning("rejection note not recorded: it lists other results than this one supersedes",
                       extra={"action": "rejection_note_dropped", "result_id": result.id,
                              "lists": sorted(note.rejects_result_ids), "supersedes": sorted(superseded)})
        return {"rejection_note": None}
    sent_to = set(session.execute(
        select(Delivery.destination)
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .where(ResultObject.result_id.in_(superseded), ResultObject.kind != ObjectKind.KOS)
    ).scalars().all())
    # A destination configured since never had the old objects: nothing there to reject.
    targets = [d for d in dict.fromkeys(note.destinations) if d in sent_to]
    if not targets:
        return {"rejection_note": None}
    _add_objects_and_deliveries(session, result, [obj], targets, now)
    return {"rejection_note": obj.sop_instance_uid, "rejects_result_ids": sorted(superseded),
            "rejection_destinations": targets}


def _new_result(job: Job, outcome: JobOutcome, now: datetime, previous_id: int | None) -> Result:
    return Result(
        job_id=job.id,
        study_id=job.study_id,
        bundle_name=job.bundle_name,
        bundle_version=job.bundle_version,
        **figures_of(outcome, RESULT_FIGURES),
        qc_failed=bool(outcome.qc_reasons) or not outcome.eligible,
        series_verdicts=list(outcome.series_verdicts),
        timings=dict(outcome.timings),
        created_at=now,
        supersedes_result_id=previous_id,
        superseded=False,
        station_key=outcome.station_key,
        scoring_sha256=outcome.scoring_sha256,
        reference_kind=outcome.reference_kind,
        reference_id=outcome.reference_id,
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
    now = clock(now)
    policy = policy or RetryPolicy()
    begin_write(session)
    try:
        job = _fenced_job(session, job_id, worker_id)
        if job is None:
            session.rollback()
            return None
        limit = min(job.max_attempts, policy.max_attempts)
        # Viewers read last_error and the audit trail: no value from a data set may be in it.
        reason = scrub(reason)
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
            add_audit(
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
    now = clock(now)
    with write_transaction(session):
        stmt = select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        expired = session.execute(locked(stmt, skip_locked=is_postgres(session))).scalars().all()
        for job in expired:
            job.last_error = f"lease expired (worker {job.lease_owner}, attempt {job.attempts})"
            job.lease_owner = None
            job.lease_expires_at = None
            if job.attempts >= job.max_attempts:
                job.state = JobState.FAILED
                job.finished_at = now
                add_audit(
                    session, SYSTEM_ACTOR, "job_failed", now, job.study_id,
                    {"job_id": job.id, "attempts": job.attempts, "reason": job.last_error},
                )
            else:
                job.state = JobState.QUEUED
                job.available_at = now
        count = len(expired)
    if count:
        logger.warning("expired leases recovered", extra={"action": "requeue_expired", "jobs": count})
    return count
