"""Archive re-screening runs: the query, the studies found and how far each got.

`headscreen rescreen` (daemon.rescreen) finds studies on a PACS and retrieves them;
the receiver stores them as any other, and the jobs of a study a run retrieved are
queued at RESCREEN_PRIORITY, behind live studies, and tagged with the run (whose
`record_only` decides whether results are sent: db.jobs.finish_job). Everything is
in the database, so a stopped or killed run resumes where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from headscreen.db.engine import write_transaction
from headscreen.db.models import (
    Instance,
    Job,
    RescreenItem,
    RescreenItemState,
    RescreenRun,
    RescreenRunState,
    Result,
    Series,
    Study,
)
from headscreen.db.states import JobState, StudyState
from headscreen.db.sweep import enqueue_jobs
from headscreen.db.txn import (
    ACTIVE_JOB_STATES,
    DEFAULT_JOB_MAX_ATTEMPTS,
    add_audit,
    clock,
    end_read,
    insert_ignore,
    locked,
)
from headscreen.db.types import BundleRef
from headscreen.privacy import scrub

logger = logging.getLogger(__name__)

OPEN_ITEM_STATES = (RescreenItemState.PENDING, RescreenItemState.RETRIEVING, RescreenItemState.QUEUED)
IN_FLIGHT_STATES = (RescreenItemState.RETRIEVING, RescreenItemState.QUEUED)


@dataclass(frozen=True)
class RescreenQuery:
    source: str  # a node's name in `destinations`
    source_kind: str  # "dimse" or "dicomweb"
    since: str  # YYYYMMDD, inclusive
    until: str
    modality: str | None
    record_only: bool


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    modalities: tuple[str, ...]
    study_date: str | None


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    source: str
    source_kind: str
    since: str
    until: str
    modality: str | None
    record_only: bool
    per_hour: float | None
    max_in_flight: int
    state: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]

    @property
    def found(self) -> int:
        return sum(self.counts.values())

    @property
    def finished_items(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("done", "skipped", "failed"))


@dataclass(frozen=True)
class PendingItem:
    item_id: int
    study_instance_uid: str
    modalities: tuple[str, ...]


def create_run(session: Session, query: RescreenQuery, per_hour: float | None, max_in_flight: int, actor: str,
               now: datetime | None = None) -> int:
    """A new run in state running (commits, audited); its id."""
    now = clock(now)
    with write_transaction(session):
        run = RescreenRun(source=query.source, source_kind=query.source_kind, since=query.since, until=query.until,
                          modality=query.modality, record_only=query.record_only, per_hour=per_hour,
                          max_in_flight=max_in_flight, state=RescreenRunState.RUNNING, created_by=actor,
                          created_at=now, updated_at=now, finished_at=None)
        session.add(run)
        session.flush()
        run_id = run.id
        add_audit(session, actor, "rescreen_started", now, None, {
            "run_id": run_id, "source": query.source, "since": query.since, "until": query.until,
            "modality": query.modality, "record_only": query.record_only})
    return run_id


def unfinished_run(session: Session, query: RescreenQuery) -> int | None:
    """The newest run of this very query that has not finished (to resume), if any (read-only)."""
    run_id = session.execute(
        select(RescreenRun.id)
        .where(RescreenRun.source == query.source, RescreenRun.since == query.since,
               RescreenRun.until == query.until, RescreenRun.record_only == query.record_only,
               RescreenRun.modality.is_(None) if query.modality is None else RescreenRun.modality == query.modality,
               RescreenRun.state != RescreenRunState.FINISHED)
        .order_by(RescreenRun.id.desc()).limit(1)
    ).scalar_one_or_none()
    end_read(session)
    return run_id


def resume_run(session: Session, run_id: int, per_hour: float | None, max_in_flight: int, actor: str,
               now: datetime | None = None) -> int:
    """Mark the run running again (commits, audited). Returns how many retrieves the stop
    cut short: they stay "retrieving" (what they brought is still queued behind live
    studies) and the run does them again first; the receiver takes the instances it
    already has as duplicates."""
    now = clock(now)
    with write_transaction(session):
        run = session.execute(locked(select(RescreenRun).where(RescreenRun.id == run_id))).scalar_one()
        run.state, run.updated_at, run.finished_at = RescreenRunState.RUNNING, now, None
        run.per_hour, run.max_in_flight = per_hour, max_in_flight
        again = session.execute(select(func.count()).select_from(RescreenItem).where(
            RescreenItem.run_id == run_id, RescreenItem.state == RescreenItemState.RETRIEVING)).scalar_one()
        add_audit(session, actor, "rescreen_resumed", now, None, {"run_id": run_id, "retrieved_again": again})
    return int(again)


def add_found(session: Session, run_id: int, studies: Sequence[FoundStudy], now: datetime | None = None) -> int:
    """Record what the query found (commits); a study the run already has is kept as it is.
    Returns how many were new."""
    now = clock(now)
    added = 0
    with write_transaction(session):
        for study in studies:
            new_id = insert_ignore(session, RescreenItem, {
                "run_id": run_id, "study_instance_uid": study.study_instance_uid,
                "modalities": "\\".join(study.modalities)[:64] or None, "study_date": study.study_date,
                "state": RescreenItemState.PENDING, "detail": None, "updated_at": now,
            }, ["run_id", "study_instance_uid"])
            added += new_id is not None
        session.execute(update(RescreenRun).where(RescreenRun.id == run_id).values(updated_at=now))
    return added


def set_run_state(session: Session, run_id: int, state: RescreenRunState, actor: str,
                  now: datetime | None = None) -> None:
    """Stopped or finished (commits, audited)."""
    now = clock(now)
    with write_transaction(session):
        session.execute(update(RescreenRun).where(RescreenRun.id == run_id).values(
            state=state, updated_at=now, finished_at=now if state == RescreenRunState.FINISHED else None))
        add_audit(session, actor, f"rescreen_{state}", now, None, {"run_id": run_id})


def touch_run(session: Session, run_id: int, now: datetime | None = None) -> None:
    """The run's heartbeat: its process is alive (commits)."""
    with write_transaction(session):
        session.execute(update(RescreenRun).where(RescreenRun.id == run_id).values(updated_at=clock(now)))


def items_in(session: Session, run_id: int, state: RescreenItemState, limit: int | None = None) -> list[PendingItem]:
    """The run's studies in one state, oldest found first (read-only)."""
    rows = session.execute(
        select(RescreenItem.id, RescreenItem.study_instance_uid, RescreenItem.modalities)
        .where(RescreenItem.run_id == run_id, RescreenItem.state == state).order_by(RescreenItem.id).limit(limit)
    ).all()
    end_read(session)
    return [PendingItem(r.id, r.study_instance_uid, tuple(m for m in (r.modalities or "").split("\\") if m))
            for r in rows]


def next_pending(session: Session, run_id: int, limit: int) -> list[PendingItem]:
    """Pending studies of the run, oldest found first (read-only)."""
    return items_in(session, run_id, RescreenItemState.PENDING, limit)


def mark_item(session: Session, item_id: int, state: RescreenItemState, detail: str | None = None,
              now: datetime | None = None, expect: RescreenItemState | None = None) -> bool:
    """Move one item to `state` (commits); with `expect`, only from that state. True when it moved."""
    now = clock(now)
    with write_transaction(session):
        stmt = update(RescreenItem).where(RescreenItem.id == item_id)
        if expect is not None:
            stmt = stmt.where(RescreenItem.state == expect)
        moved = session.execute(stmt.values(state=state, detail=None if detail is None else scrub(detail),
                                            updated_at=now)).rowcount  # type: ignore[attr-defined]
    return bool(moved)


def bundles_for(modalities: Sequence[str], bundles: Sequence[BundleRef]) -> list[BundleRef]:
    return [b for b in bundles if b.modality in set(modalities)]


def screening_state(session: Session, study_uid: str, bundles: Sequence[BundleRef]) -> str:
    """What this database already has of a study, for the bundles that would screen it:
    "screened" (a current result of each, by the same name, version and manifest sha256;
    a not-eligible result, which records no manifest, by the same name and version),
    "busy" (still receiving, or a job of it queued or running), else "absent" (read-only)."""
    study = session.execute(select(Study.id, Study.state).where(Study.study_instance_uid == study_uid)).one_or_none()
    try:
        if study is None:
            return "absent"
        if study.state == StudyState.RECEIVING or session.execute(
                select(Job.id).where(Job.study_id == study.id, Job.state.in_(ACTIVE_JOB_STATES)).limit(1)
        ).first() is not None:
            return "busy"
        for bundle in bundles:
            found = select(Result.id).where(
                Result.study_id == study.id, Result.superseded.is_(False), Result.bundle_name == bundle.name,
                Result.bundle_version == bundle.version)
            if bundle.manifest_sha256 is not None:
                # A study found not eligible was never scored: no manifest recorded, same verdict.
                found = found.where(or_(Result.scoring_sha256 == bundle.manifest_sha256,
                                        Result.scoring_sha256.is_(None)))
            if session.execute(found.limit(1)).first() is None:
                return "absent"
        return "screened" if bundles else "absent"
    finally:
        end_read(session)


def queue_retrieved(session: Session, item_id: int, bundles: Sequence[BundleRef], actor: str,
                    now: datetime | None = None, max_attempts: int = DEFAULT_JOB_MAX_ATTEMPTS) -> list[int]:
    """After a whole retrieve (every instance acknowledged, so recorded): queue the study's
    jobs at RESCREEN_PRIORITY for the run, unless the completeness sweep already did for
    the study as it now is (commits, audited). A study still receiving is completed now:
    the PACS said the retrieve is over. Returns the new job ids; the item becomes queued,
    or failed when nothing of the study arrived."""
    now = clock(now)
    with write_transaction(session):
        item = session.execute(locked(select(RescreenItem).where(RescreenItem.id == item_id))).scalar_one()
        study = session.execute(
            locked(select(Study).where(Study.study_instance_uid == item.study_instance_uid))).scalar_one_or_none()
        has_instances = study is not None and session.execute(
            select(Instance.id).join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id).limit(1)).first() is not None
        if study is None or not has_instances:
            item.state, item.detail, item.updated_at = RescreenItemState.FAILED, "the PACS sent no instance", now
            return []
        item.state, item.detail, item.updated_at = RescreenItemState.QUEUED, None, now
        session.flush()  # enqueue_jobs finds the run through the queued item
        tagged = session.execute(select(Job.id).where(
            Job.study_id == study.id, Job.generation == study.generation, Job.rescreen_run_id == item.run_id,
            Job.state != JobState.SUPERSEDED).limit(1)).first()
        if study.state == StudyState.COMPLETE and tagged is not None:
            return []  # the sweep queued them while the retrieve ran
        forced = study.state == StudyState.RECEIVING
        if forced:
            study.state, study.completed_at = StudyState.COMPLETE, now
        session.execute(update(Job).where(Job.study_id == study.id, Job.state.in_(ACTIVE_JOB_STATES))
                        .values(state=JobState.SUPERSEDED, lease_expires_at=None))
        job_ids = enqueue_jobs(session, study, bundles, now, max_attempts, actor)
        add_audit(session, actor, "rescreen_queued", now, study.id,
                  {"run_id": item.run_id, "job_ids": job_ids, "force_completed": forced})
    return job_ids


def refresh_items(session: Session, run_id: int, now: datetime | None = None) -> int:
    """Queued studies whose jobs (of the study as it is now) have all ended become done, or
    failed when one failed or none was queued (commits). Returns how many changed."""
    now = clock(now)
    changed = 0
    with write_transaction(session):
        rows = session.execute(
            select(RescreenItem, Study.id, Study.generation)
            .join(Study, Study.study_instance_uid == RescreenItem.study_instance_uid)
            .where(RescreenItem.run_id == run_id, RescreenItem.state == RescreenItemState.QUEUED)
        ).all()
        for item, study_id, generation in rows:
            jobs = session.execute(select(Job.state, Job.last_error).where(
                Job.study_id == study_id, Job.generation == generation, Job.state != JobState.SUPERSEDED)).all()
            states = {j.state for j in jobs}
            if states & set(ACTIVE_JOB_STATES):
                continue
            if JobState.FAILED in states or not jobs:
                errors = [j.last_error for j in jobs if j.state == JobState.FAILED and j.last_error]
                item.state = RescreenItemState.FAILED
                item.detail = scrub(errors[0]) if errors else (
                    "job failed" if jobs else "no job queued (no bundle for its modalities?)")
            else:
                item.state, item.detail = RescreenItemState.DONE, None
            item.updated_at = now
            changed += 1
    return changed


def item_counts(session: Session, run_id: int) -> dict[str, int]:
    rows = session.execute(
        select(RescreenItem.state, func.count()).where(RescreenItem.run_id == run_id).group_by(RescreenItem.state)
    ).all()
    end_read(session)
    return {str(state): int(n) for state, n in rows}


def _summary(run: RescreenRun, counts: dict[str, int]) -> RunSummary:
    return RunSummary(run.id, run.source, run.source_kind, run.since, run.until, run.modality, run.record_only,
                      run.per_hour, run.max_in_flight, str(run.state), run.created_by, run.created_at,
                      run.updated_at, run.finished_at, counts)


def get_run(session: Session, run_id: int) -> RunSummary | None:
    run = session.get(RescreenRun, run_id)
    summary = None if run is None else _summary(run, item_counts(session, run_id))
    end_read(session)
    return summary


def list_runs(session: Session, limit: int = 50) -> list[RunSummary]:
    runs = session.execute(select(RescreenRun).order_by(RescreenRun.id.desc()).limit(limit)).scalars().all()
    counts: dict[int, dict[str, int]] = {run.id: {} for run in runs}
    if runs:
        for run_id, state, n in session.execute(
                select(RescreenItem.run_id, RescreenItem.state, func.count())
                .where(RescreenItem.run_id.in_(list(counts))).group_by(RescreenItem.run_id, RescreenItem.state)):
            counts[run_id][str(state)] = int(n)
    summaries = [_summary(run, counts[run.id]) for run in runs]
    end_read(session)
    return summaries


def failed_items(session: Session, run_id: int, limit: int = 100) -> list[tuple[str, str | None]]:
    """(Study UID, why) of the run's failed studies (read-only)."""
    rows = session.execute(
        select(RescreenItem.study_instance_uid, RescreenItem.detail)
        .where(RescreenItem.run_id == run_id, RescreenItem.state == RescreenItemState.FAILED)
        .order_by(RescreenItem.id).limit(limit)
    ).all()
    end_read(session)
    return [(r.study_instance_uid, r.detail) for r in rows]
