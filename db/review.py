"""Admin review: listing and detail, flags, review marks, requeue, audit, counts."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Select, String, and_, cast, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.expression import ScalarSelect

from headscreen.db.engine import begin_write, write_transaction
from headscreen.db.models import RESULT_FIGURES, Delivery, Job, Result, ResultObject, Series, Study
from headscreen.db.states import JobState, StudyState
from headscreen.db.sweep import enqueue_jobs
from headscreen.db.txn import ACTIVE_JOB_STATES, DEFAULT_JOB_MAX_ATTEMPTS, add_audit, clock, end_read, locked
from headscreen.db.types import (
    BundleRef,
    DeliverySummary,
    JobSummary,
    ResultSummaryRow,
    SeriesSummary,
    StudyDetail,
    StudyFilters,
    StudyNotFound,
    StudyRow,
)
from headscreen.figures import figures_of
from headscreen.privacy import scrub

logger = logging.getLogger(__name__)


def audit(
    session: Session,
    actor: str,
    action: str,
    study_id: int | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> int:
    """Append an audit event (commits); returns its id."""
    now = clock(now)
    begin_write(session)
    event = add_audit(session, actor, action, now, study_id, detail)
    session.commit()
    return event.id


def _study_by_uid(session: Session, study_uid: str, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.study_instance_uid == study_uid)
    study = session.execute(locked(stmt) if lock else stmt).scalar_one_or_none()
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
    record_review(session, study_uid, actor, flagged=flagged, comment=comment, now=now)


def set_review(
    session: Session,
    study_uid: str,
    reviewed: bool,
    confirmed_normal: bool,
    actor: str,
    now: datetime | None = None,
) -> None:
    """Record an admin's review of a study (commits, audited). Raises StudyNotFound."""
    record_review(session, study_uid, actor, reviewed=reviewed, confirmed_normal=confirmed_normal, now=now)


def record_review(
    session: Session,
    study_uid: str,
    actor: str,
    *,
    flagged: bool | None = None,
    comment: str | None = None,
    reviewed: bool | None = None,
    confirmed_normal: bool = False,
    now: datetime | None = None,
) -> None:
    """Set the flag (with its comment) and/or the review of a study in one transaction,
    so a reader never sees one without the other (commits, audited). Raises StudyNotFound."""
    now = clock(now)
    with write_transaction(session):
        study = _study_by_uid(session, study_uid, lock=True)
        if flagged is not None:
            study.flagged = flagged
            study.flag_comment = comment
            add_audit(session, actor, "flag_set" if flagged else "flag_cleared", now, study.id, {"comment": comment})
        if reviewed is not None:
            study.reviewed = reviewed
            study.confirmed_normal = confirmed_normal
            add_audit(session, actor, "review_set", now, study.id,
                      {"reviewed": reviewed, "confirmed_normal": confirmed_normal})


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
    now = clock(now)
    with write_transaction(session):
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
        job_ids = enqueue_jobs(session, study, bundles, now, max_attempts, actor)
        add_audit(session, actor, "study_requeued", now, study.id, {"job_ids": job_ids, "force_completed": forced})
    logger.info("study requeued", extra={"action": "study_requeued", "study_uid": study_uid, "jobs": len(job_ids)})
    return job_ids


def _latest_result_id() -> ScalarSelect[Any]:
    return (
        select(func.max(Result.id))
        .where(Result.study_id == Study.id, Result.superseded.is_(False))
        .correlate(Study)
        .scalar_subquery()
    )


def _instance_count() -> ScalarSelect[Any]:
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
    if filters.max_percentile is not None:
        stmt = stmt.where(Result.percentile <= filters.max_percentile)
    if filters.received_from is not None:
        stmt = stmt.where(Study.last_received_at >= filters.received_from)
    if filters.received_to is not None:
        stmt = stmt.where(Study.last_received_at <= filters.received_to)
    if filters.screen_positive is not None:
        stmt = stmt.where(Result.screen_positive.is_(filters.screen_positive))
    if filters.min_age_gap is not None:
        stmt = stmt.where(Result.age_gap >= filters.min_age_gap)
    if filters.max_age_gap is not None:
        stmt = stmt.where(Result.age_gap <= filters.max_age_gap)
    if filters.qc_reason:
        # Bound parameter with LIKE wildcards escaped: user text is never SQL.
        pattern = "%" + filters.qc_reason.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(cast(Result.qc_reasons, String).like(pattern, escape="\\"))
    if filters.station is not None:
        stmt = stmt.where(Study.station_name == filters.station)
    if filters.reviewed is not None:
        stmt = stmt.where(Study.reviewed.is_(filters.reviewed))
    if filters.eligible is not None:
        stmt = stmt.where(Result.eligible.is_(filters.eligible))
    if filters.search:
        stmt = stmt.where(_search_clause(filters.search))
    if filters.needs_review:
        stmt = stmt.where(
            Study.reviewed.is_(False),
            or_(Result.qc_failed.is_(True), Result.screen_positive.is_(True), Study.flagged.is_(True)),
        )
    return stmt


def _search_clause(term: str) -> Any:
    """Accession number, patient ID or Study Instance UID equal to `term` or starting with
    it, ignoring case alike on both dialects (bound parameters, LIKE wildcards escaped:
    user text is never SQL)."""
    term = term.strip()
    prefix = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(*(column.ilike(prefix, escape="\\")
                 for column in (Study.accession_number, Study.patient_id, Study.study_instance_uid)))


_SORT_COLUMNS: dict[str, Any] = {
    "received": Study.last_received_at,
    "first_received": Study.first_received_at,
    "percentile": Result.percentile,
    "score": Result.anomaly_score,
    "age_gap": Result.age_gap,
    "station": Study.station_name,
    "modality": Study.modality,
}


def _apply_sort(stmt: Select[Any], filters: StudyFilters) -> Select[Any]:
    column = _SORT_COLUMNS[filters.sort]
    keys: list[Any] = [column.desc(), Study.id.desc()] if filters.descending else [column.asc(), Study.id.asc()]
    if filters.sort not in ("received", "first_received"):
        keys.insert(0, column.is_(None))  # rows without a value last, either direction
    return stmt.order_by(*keys)


def _uses_result(filters: StudyFilters) -> bool:
    return bool(
        filters.outliers_only or filters.qc_failed_only or filters.qc_reason or filters.needs_review
        or filters.sort in ("percentile", "score", "age_gap")
        or any(v is not None for v in (filters.min_percentile, filters.max_percentile, filters.screen_positive,
                                       filters.eligible,
                                       filters.min_age_gap, filters.max_age_gap))
    )


def _join_current_result(session: Session, stmt: Select[Any]) -> Select[Any]:
    """Outer-join each study's current result: not superseded, and no newer one that is not.

    Written as NOT EXISTS rather than `id = (SELECT max(id) ...)`: PostgreSQL plans it
    as an anti-join (nested loop for a first page, hash for a full sort) where the
    max() form runs a subquery per study or aggregates every result first.
    """
    newer = aliased(Result)
    is_newest = ~exists().where(newer.study_id == Result.study_id, newer.superseded.is_(False), newer.id > Result.id)
    return stmt.outerjoin(Result, and_(Result.study_id == Study.id, Result.superseded.is_(False), is_newest))


def _matching_ids(session: Session, filters: StudyFilters) -> Select[Any]:
    stmt = select(Study.id)
    if _uses_result(filters):
        stmt = _join_current_result(session, stmt)
    return _apply_filters(stmt, filters)


def count_studies(session: Session, filters: StudyFilters | None = None, cap: int = 10_000) -> tuple[int, bool]:
    """How many studies match (read-only), counting at most `cap`; (count, capped).

    The cap keeps a page cheap at 100,000 studies: the console shows "10,000+".
    """
    filters = filters or StudyFilters()
    inner = _matching_ids(session, filters).limit(cap + 1).subquery()
    total = int(session.execute(select(func.count()).select_from(inner)).scalar_one())
    end_read(session)
    return min(total, cap), total > cap


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
        station_name=study.station_name,
        reviewed=study.reviewed,
        confirmed_normal=study.confirmed_normal,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        study_date=study.study_date,
    )
    if result is None:
        return row
    return replace(
        row,
        result_id=result.id,
        bundle_name=result.bundle_name,
        bundle_version=result.bundle_version,
        **figures_of(result, RESULT_FIGURES),
        qc_failed=result.qc_failed,
    )


def list_studies(session: Session, filters: StudyFilters | None = None) -> list[StudyRow]:
    """Studies with their latest current result (read-only); newest arrivals first unless
    `filters.sort` says otherwise.

    The page's study ids are found first (index-backed sort, result joined only when a
    filter or the sort needs it); the full rows are then read for those ids alone, so a
    deep page does not compute instance counts for every skipped row.
    """
    filters = filters or StudyFilters()
    ids = list(session.execute(
        _apply_sort(_matching_ids(session, filters), filters).limit(filters.limit).offset(filters.offset)
    ).scalars())
    if not ids:
        end_read(session)
        return []
    found = {study.id: (study, result, count)
             for study, result, count in session.execute(_study_rows_query().where(Study.id.in_(ids))).all()}
    jobs = _job_summaries(session, ids)
    out = [_to_row(*found[i], jobs.get(i, {})) for i in ids]
    end_read(session)
    return out


def get_study(session: Session, study_uid: str) -> StudyDetail | None:
    """Everything about one study for the admin view (read-only); None when unknown."""
    found = session.execute(
        _study_rows_query().where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    if found is None:
        end_read(session)
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
    end_read(session)
    return detail


def _series_of(session: Session, study_id: int) -> list[SeriesSummary]:
    rows = session.execute(
        select(Series).where(Series.study_id == study_id).order_by(Series.series_number, Series.id)
    ).scalars()
    return [
        SeriesSummary(s.series_instance_uid, s.modality, s.series_number, s.series_description, s.instance_count)
        for s in rows
    ]


def _scrubbed(text: str | None) -> str | None:
    # Every console reader sees error text sanitised, also rows written before reasons were.
    return None if text is None else scrub(text)


def _jobs_of(session: Session, study_id: int) -> list[JobSummary]:
    rows = session.execute(select(Job).where(Job.study_id == study_id).order_by(Job.id)).scalars()
    return [
        JobSummary(
            j.id, j.bundle_name, j.bundle_version, j.generation, str(j.state),
            j.attempts, _scrubbed(j.last_error), j.created_at, j.finished_at,
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
            **figures_of(r, RESULT_FIGURES),
            series_verdicts=list(r.series_verdicts),
            timings=dict(r.timings),
            created_at=r.created_at,
            superseded=r.superseded,
            supersedes_result_id=r.supersedes_result_id,
            station_key=r.station_key,
            reference_kind=None if r.reference_kind is None else str(r.reference_kind),
            reference_id=r.reference_id,
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
            d.attempts, _scrubbed(d.last_error), d.last_status, d.delivered_at,
        )
        for d, o in rows
    ]
