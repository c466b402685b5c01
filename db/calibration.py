"""Site references: healthy score distributions estimated from this site's own studies.

The estimate itself (threshold rule, outliers) is daemon.reference's; here are the
reads it needs and the only writes (create, retire; both audited). A reference is
never deleted or changed after creation: retiring it keeps who did it and why.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Row, and_, case, func, select
from sqlalchemy.orm import Session

from headscreen.db.engine import write_transaction
from headscreen.db.models import Result, ShadowResult, SiteReference, Study
from headscreen.db.states import ReferenceKind
from headscreen.db.txn import add_audit, clock, end_read, locked
from headscreen.db.types import (
    CalibrationCandidate,
    NewSiteReference,
    ReferenceNotFound,
    SiteReferenceRow,
    StationCounts,
)

logger = logging.getLogger(__name__)


def _row(ref: SiteReference) -> SiteReferenceRow:
    return SiteReferenceRow(
        reference_id=ref.id, bundle_name=ref.bundle_name, bundle_version=ref.bundle_version,
        scoring_sha256=ref.scoring_sha256, grouping=ref.grouping, station=ref.station, rule=ref.rule,
        scores=[float(v) for v in ref.scores], n=ref.n, threshold=ref.threshold, specificity=ref.specificity,
        provenance=dict(ref.provenance), result_ids=[int(v) for v in ref.result_ids], created_at=ref.created_at,
        created_by=ref.created_by, retired_at=ref.retired_at, retired_by=ref.retired_by,
        retire_reason=ref.retire_reason,
    )


def calibration_candidates(session: Session, bundle_name: str, bundle_version: str,
                           confirmed_normal_only: bool = False) -> list[CalibrationCandidate]:
    """Current results of a bundle that name their scanner, and its shadow verdicts beside
    current results, oldest first (read-only)."""
    stmt = (
        select(Result.id, Result.station_key, Result.eligible, Result.anomaly_score, Result.scoring_sha256,
               Study.confirmed_normal, Study.flagged, Result.predicted_age, Result.chronological_age,
               Result.age_offset)
        .join(Study, Study.id == Result.study_id)
        .where(Result.bundle_name == bundle_name, Result.bundle_version == bundle_version,
               Result.superseded.is_(False), Result.station_key.is_not(None))
        .order_by(Result.id)
    )
    if confirmed_normal_only:
        stmt = stmt.where(Study.confirmed_normal.is_(True))
    rows: list[Row[Any]] = list(session.execute(stmt).all())
    # A shadow bundle's verdicts count too, so it can be calibrated before it is promoted.
    # They are identified by the current active result of the same study.
    shadow = (
        select(ShadowResult.result_id, ShadowResult.station_key, ShadowResult.eligible, ShadowResult.anomaly_score,
               ShadowResult.scoring_sha256, Study.confirmed_normal, Study.flagged, ShadowResult.predicted_age,
               ShadowResult.chronological_age, ShadowResult.age_offset)
        .join(Result, Result.id == ShadowResult.result_id)
        .join(Study, Study.id == ShadowResult.study_id)
        .where(ShadowResult.bundle_name == bundle_name, ShadowResult.bundle_version == bundle_version,
               Result.superseded.is_(False), ShadowResult.station_key.is_not(None), ShadowResult.error.is_(None))
        .order_by(ShadowResult.result_id)
    )
    if confirmed_normal_only:
        shadow = shadow.where(Study.confirmed_normal.is_(True))
    seen = {r[0] for r in rows}
    rows += [r for r in session.execute(shadow).all() if r[0] not in seen]
    rows.sort(key=lambda r: r[0])
    end_read(session)
    return [CalibrationCandidate(result_id=r[0], station_key=r[1], eligible=bool(r[2]),
                                 anomaly_score=_float(r[3]), scoring_sha256=r[4],
                                 confirmed_normal=bool(r[5]), flagged=bool(r[6]), predicted_age=_float(r[7]),
                                 chronological_age=_float(r[8]), age_offset=_float(r[9])) for r in rows]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def create_site_reference(session: Session, new: NewSiteReference, actor: str,
                          now: datetime | None = None) -> SiteReferenceRow:
    """Store a site reference (commits, audited); it is the active one for its bundle
    manifest and scanner group from now on, being the newest."""
    now = clock(now)
    provenance = {**new.provenance, "created_by": actor, "created_at": now.isoformat()}
    with write_transaction(session):
        ref = SiteReference(
            bundle_name=new.bundle_name, bundle_version=new.bundle_version, scoring_sha256=new.scoring_sha256,
            grouping=new.grouping, station=new.station, rule=new.rule, scores=[float(v) for v in new.scores],
            n=len(new.scores), threshold=float(new.threshold), specificity=float(new.specificity),
            provenance=provenance, result_ids=[int(v) for v in new.result_ids], created_at=now, created_by=actor,
        )
        session.add(ref)
        session.flush()
        add_audit(session, actor, "site_reference_created", now, None, {
            "reference_id": ref.id, "bundle": f"{new.bundle_name}-{new.bundle_version}", "station": new.station,
            "grouping": new.grouping, "rule": new.rule, "n": ref.n, "threshold": ref.threshold,
        })
        row = _row(ref)
    logger.info("site reference created", extra={"action": "site_reference_created", "reference_id": row.reference_id,
                                                 "bundle": row.bundle_key, "station": row.station, "n": row.n})
    return row


def retire_site_reference(session: Session, reference_id: int, actor: str, reason: str,
                          now: datetime | None = None) -> SiteReferenceRow:
    """Retire an active site reference (commits, audited); the next newest active one of
    its bundle and scanner group, if any, is used again. Raises ReferenceNotFound."""
    now = clock(now)
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("reason: say why the reference is retired")
    with write_transaction(session):
        ref = session.execute(
            locked(select(SiteReference).where(SiteReference.id == reference_id))).scalar_one_or_none()
        if ref is None or ref.retired_at is not None:
            raise ReferenceNotFound(f"no active site reference with id {reference_id}")
        ref.retired_at, ref.retired_by, ref.retire_reason = now, actor, reason[:2000]
        add_audit(session, actor, "site_reference_retired", now, None, {
            "reference_id": ref.id, "bundle": f"{ref.bundle_name}-{ref.bundle_version}", "station": ref.station,
            "reason": ref.retire_reason,
        })
        row = _row(ref)
    logger.info("site reference retired", extra={"action": "site_reference_retired", "reference_id": reference_id})
    return row


def list_site_references(session: Session, include_retired: bool = True) -> list[SiteReferenceRow]:
    """Every site reference, newest first (read-only)."""
    stmt = select(SiteReference).order_by(SiteReference.id.desc())
    if not include_retired:
        stmt = stmt.where(SiteReference.retired_at.is_(None))
    rows = [_row(r) for r in session.execute(stmt).scalars()]
    end_read(session)
    return rows


def active_site_reference(session: Session, bundle_name: str, bundle_version: str, scoring_sha256: str,
                          grouping: str, station: str) -> SiteReferenceRow | None:
    """The newest active reference of this bundle manifest and scanner group (read-only)."""
    ref = session.execute(
        select(SiteReference)
        .where(SiteReference.bundle_name == bundle_name, SiteReference.bundle_version == bundle_version,
               SiteReference.scoring_sha256 == scoring_sha256, SiteReference.grouping == grouping,
               SiteReference.station == station, SiteReference.retired_at.is_(None))
        .order_by(SiteReference.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    row = None if ref is None else _row(ref)
    end_read(session)
    return row


def station_counts(session: Session) -> list[StationCounts]:
    """Current results per bundle and scanner (read-only), for the console."""
    scored = and_(Result.eligible.is_(True), Result.anomaly_score.is_not(None))
    rows = session.execute(
        select(Result.bundle_name, Result.bundle_version, Result.station_key, func.count(),
               func.sum(case((scored, 1), else_=0)),
               func.sum(case((and_(scored, Study.confirmed_normal.is_(True)), 1), else_=0)),
               func.sum(case((Result.reference_kind == ReferenceKind.CALIBRATING, 1), else_=0)))
        .join(Study, Study.id == Result.study_id)
        .where(Result.superseded.is_(False), Result.station_key.is_not(None))
        .group_by(Result.bundle_name, Result.bundle_version, Result.station_key)
        .order_by(Result.bundle_name, Result.bundle_version, Result.station_key)
    ).all()
    end_read(session)
    return [StationCounts(name, version, station, int(total), int(n_scored or 0), int(normal or 0), int(calib or 0))
            for name, version, station, total, n_scored, normal, calib in rows]
