"""Shadow bundles: the role of each bundle (active, shadow, retired), the results shadow
bundles record beside the active one, and the reads the comparison needs.

Which bundle does what for a study is decided by daemon.shadow from the configured
bundles and the roles here; this module only stores roles (every change audited)
and shadow results (never delivered: no objects, no deliveries).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from headscreen.db.engine import write_transaction
from headscreen.db.models import SHADOW_FIGURES, BundleRole, BundleRoleKind, Job, Result, ShadowResult, Study
from headscreen.db.states import JobState
from headscreen.db.txn import SYSTEM_ACTOR, add_audit, clock, end_read, locked
from headscreen.db.types import (
    BundleRef,
    BundleRoleRow,
    BundleScoreRow,
    JobTicket,
    RoleChange,
    RoleConflict,
    ShadowOutcome,
    ShadowResultRow,
)
from headscreen.figures import figures_of
from headscreen.privacy import scrub

logger = logging.getLogger(__name__)

MAX_REASON = 2000


def _row(role: BundleRole) -> BundleRoleRow:
    return BundleRoleRow(bundle_name=role.bundle_name, bundle_version=role.bundle_version, modality=role.modality,
                         manifest_sha256=role.manifest_sha256, role=str(role.role), changed_at=role.changed_at,
                         changed_by=role.changed_by, reason=role.reason)


def list_bundle_roles(session: Session) -> list[BundleRoleRow]:
    """Every recorded bundle role (read-only), by modality and key."""
    rows = [_row(r) for r in session.execute(
        select(BundleRole).order_by(BundleRole.modality, BundleRole.bundle_name, BundleRole.bundle_version)
    ).scalars()]
    end_read(session)
    return rows


def recorded_role(row: BundleRoleRow | BundleRole | None, bundle: BundleRef) -> str | None:
    """The role recorded for `bundle`, or None when none is, or it was recorded for another
    manifest (the folder was rewritten since: its old role does not carry over)."""
    if row is None:
        return None
    if bundle.manifest_sha256 is not None and row.manifest_sha256 != bundle.manifest_sha256:
        return None
    return str(row.role)


def change_bundle_roles(session: Session, changes: Sequence[RoleChange], actor: str, reason: str,
                        action: str = "bundle_role_changed", now: datetime | None = None) -> list[BundleRoleRow]:
    """Apply role changes together (commits); one audit event per changed bundle.

    Each change states the role its caller saw (`expected`); if the recorded role differs
    now, nothing changes and RoleConflict is raised. Demotions go first, so a promotion
    never meets the old active bundle (at most one active per modality, also a unique index).
    """
    now = clock(now)
    reason = (reason or "").strip()[:MAX_REASON]
    if not reason:
        raise ValueError("reason: say why the bundle role changes")
    if not changes:
        return []
    order = sorted(changes, key=lambda c: c.role == "active")
    try:
        changed = _apply_role_changes(session, order, actor, reason, action, now)
    except IntegrityError:
        # Another admin recorded a role for the same bundle or modality at the same moment.
        raise RoleConflict("bundle roles changed meanwhile; look again and retry") from None
    logger.info("bundle roles changed", extra={"action": action, "user": actor,
                                               "changes": {r.key: r.role for r in changed}})
    return changed


def _apply_role_changes(session: Session, order: Sequence[RoleChange], actor: str, reason: str, action: str,
                        now: datetime) -> list[BundleRoleRow]:
    with write_transaction(session):
        changed = []
        for change in order:
            bundle = change.bundle
            row = session.execute(locked(select(BundleRole).where(
                BundleRole.bundle_name == bundle.name, BundleRole.bundle_version == bundle.version)
            )).scalar_one_or_none()
            before = recorded_role(row, bundle)
            if before != change.expected:
                raise RoleConflict(f"{bundle.key}: its role is {before or 'not recorded'} now, not "
                                   f"{change.expected or 'not recorded'}; look again and retry")
            if change.role == "active":
                other = session.execute(locked(select(BundleRole).where(
                    BundleRole.modality == bundle.modality, BundleRole.role == BundleRoleKind.ACTIVE,
                    or_(BundleRole.bundle_name != bundle.name, BundleRole.bundle_version != bundle.version)
                ))).scalars().first()
                if other is not None:
                    raise RoleConflict(f"{other.bundle_name}-{other.bundle_version} is still active for "
                                       f"{bundle.modality}; a promotion demotes it in the same change")
            if row is None:
                row = BundleRole(bundle_name=bundle.name, bundle_version=bundle.version, modality=bundle.modality)
                session.add(row)
            row.manifest_sha256 = bundle.manifest_sha256
            row.role = BundleRoleKind(change.role)
            row.changed_at, row.changed_by, row.reason = now, actor, reason
            session.flush()
            # "why" and not "reason": it is what an admin typed, not error text to scrub.
            add_audit(session, actor, action, now, None, {
                "bundle": bundle.key, "modality": bundle.modality, "from": before, "to": change.role,
                "manifest_sha256": bundle.manifest_sha256, "why": reason})
            changed.append(_row(row))
    return changed


def rebind_job(session: Session, job_id: int, worker_id: str, bundle: BundleRef,
               now: datetime | None = None) -> JobTicket | None:
    """A claimed job whose bundle is no longer the active one: run it with `bundle`, the
    active one now (commits, audited), fenced on the lease like `finish_job`. When the study
    already has a job of this generation for `bundle`, this one is superseded instead and
    None is returned (the study is screened once, by that job)."""
    now = clock(now)
    with write_transaction(session):
        job = session.execute(locked(select(Job).where(Job.id == job_id))).scalar_one_or_none()
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
            return None
        before = f"{job.bundle_name}-{job.bundle_version}"
        twin = session.execute(select(Job.id).where(
            Job.study_id == job.study_id, Job.generation == job.generation, Job.id != job.id,
            Job.bundle_name == bundle.name, Job.bundle_version == bundle.version,
            Job.state.in_((JobState.QUEUED, JobState.RUNNING, JobState.DONE)))).scalars().first()
        if twin is not None:
            job.state, job.lease_owner, job.lease_expires_at, job.finished_at = JobState.SUPERSEDED, None, None, now
            add_audit(session, SYSTEM_ACTOR, "job_dropped", now, job.study_id, {
                "job_id": job.id, "bundle": before, "active_bundle": bundle.key, "screened_by_job": twin})
            return None
        job.bundle_name, job.bundle_version = bundle.name, bundle.version
        add_audit(session, SYSTEM_ACTOR, "job_rebound", now, job.study_id, {
            "job_id": job.id, "from": before, "to": bundle.key})
        study_uid = session.execute(select(Study.study_instance_uid).where(Study.id == job.study_id)).scalar_one()
        ticket = JobTicket(job_id=job.id, study_id=job.study_id, study_instance_uid=study_uid,
                           bundle_name=job.bundle_name, bundle_version=job.bundle_version,
                           generation=job.generation, attempt=job.attempts)
    logger.info("job rebound to the active bundle", extra={"action": "job_rebound", "job_id": job_id,
                                                           "from": before, "to": bundle.key})
    return ticket


def record_shadow_result(session: Session, result_id: int, shadow: ShadowOutcome,
                         now: datetime | None = None) -> int | None:
    """Record a shadow bundle's verdict beside an active result (commits, audited); its id.
    A second record of the same bundle for the same result is ignored (None)."""
    now = clock(now)
    with write_transaction(session):
        result = session.execute(select(Result.id, Result.study_id).where(Result.id == result_id)).one_or_none()
        if result is None:
            raise ValueError(f"result_id: no result {result_id}")
        exists = session.execute(select(ShadowResult.id).where(
            ShadowResult.result_id == result_id, ShadowResult.bundle_name == shadow.bundle_name,
            ShadowResult.bundle_version == shadow.bundle_version)).scalar_one_or_none()
        if exists is not None:
            return None
        row = ShadowResult(
            result_id=result_id, study_id=result.study_id, bundle_name=shadow.bundle_name,
            bundle_version=shadow.bundle_version, scoring_sha256=shadow.scoring_sha256,
            **figures_of(shadow, SHADOW_FIGURES), terms={k: float(v) for k, v in shadow.terms.items()},
            station_key=shadow.station_key, reference_kind=shadow.reference_kind, reference_id=shadow.reference_id,
            shared_preprocessing=shadow.shared_preprocessing, timings=dict(shadow.timings),
            # Viewers read it: no value from a data set may be in it.
            error=None if shadow.error is None else scrub(shadow.error), created_at=now,
        )
        session.add(row)
        session.flush()
        add_audit(session, SYSTEM_ACTOR, "shadow_result_recorded", now, result.study_id, {
            "shadow_result_id": row.id, "result_id": result_id,
            "bundle": f"{shadow.bundle_name}-{shadow.bundle_version}", "failed": shadow.error is not None})
        shadow_id = row.id
    return shadow_id


def shadow_results_of_study(session: Session, study_id: int) -> list[ShadowResultRow]:
    """Shadow verdicts on one study, oldest first (read-only)."""
    rows = session.execute(select(ShadowResult).where(ShadowResult.study_id == study_id)
                           .order_by(ShadowResult.id)).scalars().all()
    out = [ShadowResultRow(
        shadow_result_id=r.id, result_id=r.result_id, bundle_name=r.bundle_name, bundle_version=r.bundle_version,
        **figures_of(r, SHADOW_FIGURES), reference_kind=None if r.reference_kind is None else str(r.reference_kind),
        shared_preprocessing=bool(r.shared_preprocessing), timings=dict(r.timings),
        error=None if r.error is None else scrub(r.error), created_at=r.created_at) for r in rows]
    end_read(session)
    return out


def bundle_scores(session: Session, bundles: Sequence[tuple[str, str]]) -> list[BundleScoreRow]:
    """The current verdicts of these bundles (name, version) on every study (read-only):
    their results that are not superseded, and their shadow results beside such results."""
    if not bundles:
        return []
    wanted_result = or_(*(and_(Result.bundle_name == n, Result.bundle_version == v) for n, v in bundles))
    wanted_shadow = or_(*(and_(ShadowResult.bundle_name == n, ShadowResult.bundle_version == v) for n, v in bundles))
    results = session.execute(
        select(Result.study_id, Study.study_instance_uid, Result.bundle_name, Result.bundle_version, Result.id,
               Result.eligible, Result.anomaly_score, Result.percentile, Result.screen_positive, Result.created_at,
               Result.predicted_age, Result.chronological_age, Study.confirmed_normal)
        .join(Study, Study.id == Result.study_id)
        .where(Result.superseded.is_(False), wanted_result)
    ).all()
    shadows = session.execute(
        select(ShadowResult.study_id, Study.study_instance_uid, ShadowResult.bundle_name,
               ShadowResult.bundle_version, ShadowResult.id, ShadowResult.eligible, ShadowResult.anomaly_score,
               ShadowResult.percentile, ShadowResult.screen_positive, ShadowResult.created_at,
               ShadowResult.predicted_age, ShadowResult.chronological_age, Study.confirmed_normal,
               ShadowResult.error)
        .join(Result, Result.id == ShadowResult.result_id)
        .join(Study, Study.id == ShadowResult.study_id)
        .where(Result.superseded.is_(False), wanted_shadow)
    ).all()
    end_read(session)
    out = [BundleScoreRow(r[0], r[1], r[2], r[3], "result", r[4], bool(r[5]), r[6], r[7], r[8], False, r[9],
                          r[10], r[11], bool(r[12])) for r in results]
    out += [BundleScoreRow(r[0], r[1], r[2], r[3], "shadow", r[4], r[5], r[6], r[7], r[8], r[13] is not None, r[9],
                           r[10], r[11], bool(r[12])) for r in shadows]
    return out
