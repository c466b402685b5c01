"""Study completeness: complete quiet or whole studies and enqueue their jobs."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from headscreen.db.completeness import InstanceFacts, study_wholeness
from headscreen.db.engine import begin_write
from headscreen.db.models import (
    LIVE_PRIORITY,
    RESCREEN_PRIORITY,
    Instance,
    Job,
    RescreenItem,
    RescreenItemState,
    Series,
    Study,
)
from headscreen.db.states import JobState, StudyState
from headscreen.db.txn import (
    ACTIVE_JOB_STATES,
    DEFAULT_JOB_MAX_ATTEMPTS,
    SYSTEM_ACTOR,
    add_audit,
    clock,
    end_read,
    execute_counted,
    locked,
)
from headscreen.db.types import BundleRef

logger = logging.getLogger(__name__)


def sweep_completeness(
    session: Session,
    now: datetime | None,
    quiet_period_s: float,
    whole_quiet_s: float,
    bundles: Sequence[BundleRef],
    max_attempts: int = DEFAULT_JOB_MAX_ATTEMPTS,
    released_quiet_s: float | None = None,
) -> list[int]:
    """Complete the receiving studies that are ready and enqueue their jobs.

    Ready: quiet for `quiet_period_s`, or whole by content
    (`db.completeness.study_wholeness`) and quiet for `whole_quiet_s`, or for
    `released_quiet_s` (None: not used) once the associations that sent it have been
    released since its last instance (`Study.released_at`): the sender said it is done,
    so only another association can still add to it. One transaction per study.
    Returns the ids of the studies completed.
    """
    now = clock(now)
    quiet_enough = Study.last_received_at <= now - timedelta(seconds=min(quiet_period_s, whole_quiet_s))
    if released_quiet_s is not None:
        # Only released studies on the shorter wait: the others are not locked every sweep.
        quiet_enough = or_(quiet_enough, and_(
            Study.released_at >= Study.last_received_at,
            Study.last_received_at <= now - timedelta(seconds=released_quiet_s)))
    candidate_ids = session.execute(
        select(Study.id)
        .where(Study.state == StudyState.RECEIVING, quiet_enough)
        .order_by(Study.last_received_at, Study.id)
    ).scalars().all()
    end_read(session)
    completed = []
    for study_id in candidate_ids:
        if _complete_if_ready(session, study_id, now, quiet_period_s, whole_quiet_s, bundles, max_attempts,
                              released_quiet_s):
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
    released_quiet_s: float | None = None,
) -> bool:
    begin_write(session)
    try:
        study = session.execute(locked(select(Study).where(Study.id == study_id))).scalar_one()
        reason = _readiness(session, study, now, quiet_period_s, whole_quiet_s, released_quiet_s)
        if reason is None:
            session.rollback()
            return False
        study.state = StudyState.COMPLETE
        study.completed_at = now
        _supersede_older_jobs(session, study)
        job_ids = enqueue_jobs(session, study, bundles, now, max_attempts, SYSTEM_ACTOR)
        log_extra = {
            "action": "study_complete",
            "study_uid": study.study_instance_uid,
            "reason": reason,
            "generation": study.generation,
            "jobs": len(job_ids),
        }
        add_audit(
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
    session: Session, study: Study, now: datetime, quiet_period_s: float, whole_quiet_s: float,
    released_quiet_s: float | None = None,
) -> str | None:
    if study.state != StudyState.RECEIVING:
        return None
    quiet_s = (now - study.last_received_at).total_seconds()
    if quiet_s >= quiet_period_s:
        return "quiet period elapsed"
    if quiet_s >= whole_quiet_s:
        reason = "whole by content"
    elif (released_quiet_s is not None and quiet_s >= released_quiet_s and study.released_at is not None
          and study.released_at >= study.last_received_at):
        reason = "whole by content, sender released"
    else:
        return None
    verdict = study_wholeness(list(_instance_facts(session, study.id).values()))
    return reason if verdict.whole else None


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
    return execute_counted(
        session,
        update(Job)
        .where(Job.study_id == study.id, Job.generation < study.generation, Job.state.in_(ACTIVE_JOB_STATES))
        .values(state=JobState.SUPERSEDED, lease_expires_at=None)
    )


def _study_modalities(session: Session, study: Study) -> set[str]:
    found = session.execute(
        select(Series.modality).where(Series.study_id == study.id).distinct()
    ).scalars().all()
    return {m for m in [*found, study.modality] if m}


def enqueue_jobs(
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
        add_audit(
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
    run_id = rescreen_run_of(session, study.study_instance_uid)
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
            priority=LIVE_PRIORITY if run_id is None else RESCREEN_PRIORITY,
            rescreen_run_id=run_id,
        )
        for bundle in matching
    ]
    session.add_all(jobs)
    session.flush()
    return [job.id for job in jobs]


def rescreen_run_of(session: Session, study_uid: str) -> int | None:
    """The re-screening run that is retrieving or has queued this study, if any: its jobs
    then wait behind live studies (and the run decides whether results are sent)."""
    return session.execute(
        select(RescreenItem.run_id)
        .where(RescreenItem.study_instance_uid == study_uid,
               RescreenItem.state.in_((RescreenItemState.RETRIEVING, RescreenItemState.QUEUED)))
        .order_by(RescreenItem.id.desc())
        .limit(1)
    ).scalar_one_or_none()
