"""Read-only queries for the admin console: overview, failures, audit trail, drift,
training manifest and metrics. Nothing here changes state."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from headscreen.db.engine import is_postgres
from headscreen.db.models import AuditEvent, Delivery, IngestRejection, Instance, Job, Result, ResultObject, Study
from headscreen.db.states import DeliveryState, JobState
from headscreen.db.txn import clock, end_read
from headscreen.privacy import scrub

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DayCount:
    day: str  # YYYY-MM-DD (UTC)
    received: int
    completed: int
    results: int
    failed: int


@dataclass(frozen=True)
class QueueHealth:
    jobs: dict[str, int]
    oldest_queued_s: float | None
    running: list[dict[str, Any]]  # job id, worker, lease expiry, heartbeat age
    expired_leases: int
    last_heartbeat_s: float | None


@dataclass(frozen=True)
class Overview:
    today: dict[str, int]
    days: list[DayCount]
    queue: QueueHealth
    deliveries: dict[str, int]
    latency_s: list[tuple[str, float, int]]  # (day, mean seconds received->result, results)


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    study_instance_uid: str
    bundle: str
    attempts: int
    last_error: str | None
    finished_at: datetime | None
    accession_number: str | None = None  # patient data: the authenticated console only
    patient_id: str | None = None


@dataclass(frozen=True)
class DeadDelivery:
    delivery_id: int
    study_instance_uid: str
    destination: str
    kind: str
    attempts: int
    last_status: int | None
    last_error: str | None
    accession_number: str | None = None  # patient data: the authenticated console only
    patient_id: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str
    action: str
    study_instance_uid: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class ScoreBucket:
    station: str
    period: str  # YYYY-MM-DD, the first day of the period
    count: int
    mean_percentile: float | None
    mean_score: float | None
    positives: int
    percentile_quartiles: tuple[float, float, float] | None  # 25th, 50th, 75th of the percentiles


@dataclass(frozen=True)
class ManifestRow:
    study_instance_uid: str
    series_instance_uid: str
    age: float | None
    station: str | None
    modality: str | None


def _day(value: datetime) -> str:
    return value.date().isoformat()


def _utc_day(session: Session, column: Any) -> Any:
    """The UTC calendar day of a timestamp column as 'YYYY-MM-DD' text, computed in SQL."""
    if is_postgres(session):
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.date(column)  # SQLite stores UTC text; date() takes its day


def _seconds_between(session: Session, later: Any, earlier: Any) -> Any:
    if is_postgres(session):
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def _per_day(session: Session, column: Any, since: datetime, *where: Any) -> dict[str, int]:
    day = _utc_day(session, column)
    rows = session.execute(select(day, func.count()).where(column >= since, *where).group_by(day)).all()
    return {str(d): int(n) for d, n in rows}


def overview(session: Session, days: int = 14, now: datetime | None = None) -> Overview:
    """Counts per day, queue health, deliveries and latency (read-only)."""
    now = clock(now)
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    received = _per_day(session, Study.first_received_at, start)
    completed = _per_day(session, Study.completed_at, start)
    results = _per_day(session, Result.created_at, start)
    failed = _per_day(session, Job.finished_at, start, Job.state == JobState.FAILED)
    day_list = [_day(start + timedelta(days=i)) for i in range(days)]
    series = [DayCount(d, received.get(d, 0), completed.get(d, 0), results.get(d, 0), failed.get(d, 0))
              for d in day_list]
    today = series[-1]
    queue = queue_health(session, now)
    delivery_rows = session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    deliveries = {str(s): 0 for s in DeliveryState} | {str(s): int(c) for s, c in delivery_rows}
    latency = _latency_per_day(session, start)
    end_read(session)
    return Overview(
        today={"received": today.received, "completed": today.completed, "results": today.results,
               "failed": today.failed, "queued": queue.jobs.get("queued", 0),
               "running": queue.jobs.get("running", 0)},
        days=series, queue=queue, deliveries=deliveries,
        latency_s=[(d, *latency[d]) for d in day_list if d in latency],
    )


def _latency_per_day(session: Session, since: datetime) -> dict[str, tuple[float, int]]:
    day = _utc_day(session, Result.created_at)
    seconds = _seconds_between(session, Result.created_at, Study.last_received_at)
    rows = session.execute(
        select(day, func.avg(seconds), func.count())
        .join(Study, Study.id == Result.study_id)
        .where(Result.created_at >= since)
        .group_by(day)
    ).all()
    return {str(d): (max(0.0, float(mean or 0.0)), int(n)) for d, mean, n in rows}


def queue_health(session: Session, now: datetime | None = None) -> QueueHealth:
    now = clock(now)
    job_rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    jobs = {str(s): 0 for s in JobState} | {str(s): int(c) for s, c in job_rows}
    oldest = session.execute(
        select(func.min(Job.available_at)).where(Job.state == JobState.QUEUED)
    ).scalar_one_or_none()
    running_rows = session.execute(
        select(Job.id, Job.lease_owner, Job.lease_expires_at, Job.heartbeat_at)
        .where(Job.state == JobState.RUNNING).order_by(Job.id).limit(50)
    ).all()
    running = [
        {"job_id": job_id, "worker": owner, "lease_expires_at": expires,
         "heartbeat_age_s": (now - beat).total_seconds() if beat else None}
        for job_id, owner, expires, beat in running_rows
    ]
    expired = sum(1 for r in running if r["lease_expires_at"] is not None and r["lease_expires_at"] < now)
    last_beat = session.execute(select(func.max(Job.heartbeat_at))).scalar_one_or_none()
    end_read(session)
    return QueueHealth(
        jobs=jobs,
        oldest_queued_s=(now - _aware(oldest)).total_seconds() if oldest else None,
        running=running,
        expired_leases=expired,
        last_heartbeat_s=(now - _aware(last_beat)).total_seconds() if last_beat else None,
    )


def _aware(value: datetime) -> datetime:
    # Aggregates bypass the UTC column type on SQLite and come back naive (or as text).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def failures(session: Session, limit: int = 200) -> tuple[list[FailedJob], list[DeadDelivery]]:
    """Failed jobs that were not re-run since, and dead-lettered deliveries (read-only)."""
    rerun = select(Job.id).where(Job.study_id == Study.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING,
                                                                          JobState.DONE)),
                                 Job.generation >= Study.generation).correlate(Study).exists()
    job_rows = session.execute(
        select(Job, Study.study_instance_uid, Study.accession_number, Study.patient_id)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.FAILED, ~rerun).order_by(Job.id.desc()).limit(limit)
    ).all()
    # Scrubbed again on the way out: rows written before reasons were sanitised may quote data-set values.
    jobs = [FailedJob(j.id, uid, f"{j.bundle_name}-{j.bundle_version}", j.attempts, _scrubbed(j.last_error),
                      j.finished_at, accession, patient)
            for j, uid, accession, patient in job_rows]
    dead_rows = session.execute(
        select(Delivery, ResultObject.kind, Study.study_instance_uid, Study.accession_number, Study.patient_id)
        .join(ResultObject, ResultObject.id == Delivery.result_object_id)
        .join(Result, Result.id == ResultObject.result_id)
        .join(Study, Study.id == Result.study_id)
        .where(Delivery.state == DeliveryState.DEAD).order_by(Delivery.id.desc()).limit(limit)
    ).all()
    dead = [DeadDelivery(d.id, uid, d.destination, str(kind), d.attempts, d.last_status, _scrubbed(d.last_error),
                         accession, patient)
            for d, kind, uid, accession, patient in dead_rows]
    end_read(session)
    return jobs, dead


def audit_trail(session: Session, study_uid: str | None = None, limit: int = 200) -> list[AuditEntry]:
    """Newest audit events first, of one study or of everything (read-only)."""
    stmt = select(AuditEvent, Study.study_instance_uid).outerjoin(Study, Study.id == AuditEvent.study_id)
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    rows = session.execute(stmt.order_by(AuditEvent.id.desc()).limit(limit)).all()
    end_read(session)
    return [AuditEntry(e.at, e.actor, e.action, uid, _scrubbed_detail(e.detail)) for e, uid in rows]


def _scrubbed(text: str | None) -> str | None:
    return None if text is None else scrub(text)


def _scrubbed_detail(detail: dict[str, Any]) -> dict[str, Any]:
    # Failure reasons are error text; comments and the rest are what our users typed or we chose.
    return {k: scrub(v) if k in ("reason", "error") and isinstance(v, str) else v for k, v in detail.items()}


def score_distributions(
    session: Session, period_days: int = 7, since: datetime | None = None, modality: str | None = None,
    now: datetime | None = None,
) -> list[ScoreBucket]:
    """Current eligible results per station and period (read-only), for drift charts."""
    now = clock(now)
    since = since or now - timedelta(days=180)
    stmt = (
        select(Study.station_name, Result.created_at, Result.percentile, Result.anomaly_score,
               Result.screen_positive)
        .join(Study, Study.id == Result.study_id)
        .where(Result.superseded.is_(False), Result.eligible.is_(True), Result.created_at >= since)
    )
    if modality is not None:
        stmt = stmt.where(Study.modality == modality)
    grouped: dict[tuple[str, str], list[tuple[float | None, float | None, bool | None]]] = defaultdict(list)
    epoch = datetime(2000, 1, 3, tzinfo=since.tzinfo)  # a Monday: periods start on Mondays for 7 days
    for station, created, percentile, score, positive in session.execute(stmt):
        index = (created - epoch).days // period_days
        period = _day(epoch + timedelta(days=index * period_days))
        grouped[(station or "(unknown)", period)].append((percentile, score, positive))
    end_read(session)
    buckets = []
    for (station, period), values in sorted(grouped.items()):
        pct = [v[0] for v in values if v[0] is not None]
        scores = [v[1] for v in values if v[1] is not None]
        buckets.append(ScoreBucket(
            station, period, len(values),
            sum(pct) / len(pct) if pct else None, sum(scores) / len(scores) if scores else None,
            sum(1 for v in values if v[2]), _quartiles(sorted(pct)),
        ))
    return buckets


def _quartiles(ordered: list[float]) -> tuple[float, float, float] | None:
    if not ordered:
        return None
    last = len(ordered) - 1
    return ordered[round(last * 0.25)], ordered[round(last * 0.5)], ordered[round(last * 0.75)]


def training_manifest(session: Session) -> list[ManifestRow]:
    """Confirmed-normal studies with the series their current result used (read-only)."""
    rows = session.execute(
        select(Study.study_instance_uid, Result.selected_series_uid, Result.chronological_age,
               Study.station_name, Study.modality)
        .join(Result, Result.study_id == Study.id)
        .where(Study.confirmed_normal.is_(True), Result.superseded.is_(False),
               Result.selected_series_uid.is_not(None))
        .order_by(Study.id, Result.id)
    ).all()
    end_read(session)
    seen: set[str] = set()
    out = []
    for uid, series_uid, age, station, modality in rows:
        if uid not in seen:
            seen.add(uid)
            out.append(ManifestRow(uid, series_uid, age, station, modality))
    return out


def metrics_snapshot(session: Session) -> dict[str, Any]:
    """Totals for the Prometheus exposition (read-only)."""
    out: dict[str, Any] = {
        "instances": int(session.execute(select(func.count(Instance.id))).scalar_one()),
        "rejections": int(session.execute(select(func.count(IngestRejection.id))).scalar_one()),
        "studies": {str(s): int(c) for s, c in
                    session.execute(select(Study.state, func.count()).group_by(Study.state))},
        "jobs": {str(s): int(c) for s, c in session.execute(select(Job.state, func.count()).group_by(Job.state))},
        "deliveries": {str(s): int(c) for s, c in
                       session.execute(select(Delivery.state, func.count()).group_by(Delivery.state))},
        "results": int(session.execute(select(func.count(Result.id))).scalar_one()),
    }
    timings: dict[str, list[float]] = defaultdict(list)
    percentiles: list[float] = []
    scores: dict[str, list[float]] = defaultdict(list)
    # Only the most recent results: the histograms describe current behaviour and stay cheap.
    rows = session.execute(
        select(Result.timings, Result.percentile, Result.anomaly_score, Result.bundle_name)
        .order_by(Result.id.desc()).limit(5000)
    ).all()
    for timing, percentile, score, bundle in rows:
        for stage, seconds in (timing or {}).items():
            if isinstance(seconds, (int, float)):
                timings[stage].append(float(seconds))
        if percentile is not None:
            percentiles.append(float(percentile))
        if score is not None:
            scores[bundle].append(float(score))
    out["timings"] = dict(timings)
    out["percentiles"] = percentiles
    out["scores"] = dict(scores)
    end_read(session)
    return out


def database_ok(session: Session) -> bool:
    try:
        session.execute(select(1)).scalar_one()
        end_read(session)
        return True
    except Exception:
        logger.exception("database check failed", extra={"action": "healthz_db"})
        session.rollback()
        return False
