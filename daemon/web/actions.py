"""What the pages and the API do, once: each action is a call of `db.api` functions
(which audit themselves) with the logged-in user as the actor."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass, is_dataclass
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from headscreen.daemon.web.context import WebContext
from headscreen.daemon.web.filters import StudyQuery
from headscreen.db import api
from headscreen.db.types import StudyDetail, StudyNotFound, StudyRow

logger = logging.getLogger(__name__)


class ReviewAction(StrEnum):
    CONFIRM = "confirm"  # finding confirmed: reviewed, stays flagged for follow-up
    DISMISS = "dismiss"  # nothing there: reviewed, flag cleared
    FLAG = "flag"  # needs attention, with a comment; not yet reviewed
    UNFLAG = "unflag"
    NORMAL = "normal"  # confirmed normal: reviewed, joins the training cohort


MAX_COMMENT = 2000


def review(ctx: WebContext, study_uid: str, action: ReviewAction, comment: str | None, actor: str) -> None:
    comment = (comment or "").strip()[:MAX_COMMENT] or None
    if action is ReviewAction.FLAG and not comment:
        raise HTTPException(status_code=422, detail="a flag needs a comment")
    try:
        with ctx.db() as session:
            if action is ReviewAction.FLAG:
                api.record_review(session, study_uid, actor, flagged=True, comment=comment)
            elif action is ReviewAction.UNFLAG:
                api.record_review(session, study_uid, actor, flagged=False)
            elif action is ReviewAction.CONFIRM:
                api.record_review(session, study_uid, actor, flagged=True, comment=comment or "finding confirmed",
                                  reviewed=True)
            elif action is ReviewAction.DISMISS:
                api.record_review(session, study_uid, actor, flagged=False, comment=comment, reviewed=True)
            elif action is ReviewAction.NORMAL:
                api.record_review(session, study_uid, actor, flagged=False, comment=comment, reviewed=True,
                                  confirmed_normal=True)
    except StudyNotFound:
        raise HTTPException(status_code=404, detail="no such study") from None
    logger.info("review action", extra={"action": f"review_{action.value}", "study_uid": study_uid, "user": actor})


def requeue(ctx: WebContext, study_uid: str, actor: str) -> list[int]:
    from headscreen.daemon.shadow import current_plan

    if not ctx.bundles:
        raise HTTPException(status_code=409, detail="no model bundles configured")
    try:
        with ctx.db() as session:
            # The active bundles only: shadows run inside the active bundle's job.
            active = current_plan(session, ctx.bundles).active
            return api.requeue_study(session, study_uid, actor, active,
                                     max_attempts=ctx.settings.job_max_attempts)
    except StudyNotFound:
        raise HTTPException(status_code=404, detail="no such study") from None


def resend(ctx: WebContext, actor: str, delivery_ids: list[int] | None, study_uid: str | None) -> int:
    with ctx.db() as session:
        return api.resend_dead(session, actor, study_instance_uid=study_uid, delivery_ids=delivery_ids)


def study_detail(ctx: WebContext, study_uid: str) -> StudyDetail:
    with ctx.db() as session:
        detail = api.get_study(session, study_uid)
    if detail is None:
        raise HTTPException(status_code=404, detail="no such study")
    return detail


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and enums as JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


CSV_COLUMNS = (
    "study_instance_uid", "accession_number", "patient_id", "study_date", "modality", "state", "station_name",
    "first_received_at", "last_received_at",
    "completed_at", "instance_count", "bundle_name", "bundle_version", "eligible", "anomaly_score", "percentile",
    "screen_positive", "predicted_age", "chronological_age", "age_gap", "age_offset", "qc_reasons", "flagged",
    "flag_comment", "reviewed", "confirmed_normal",
)


def _csv_safe(value: Any) -> str:
    """Cells that a spreadsheet would run as a formula are quoted with a leading apostrophe."""
    text = "" if value is None else (";".join(value) if isinstance(value, list) else
                                     value.isoformat() if isinstance(value, datetime) else str(value))
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def studies_csv(rows: list[StudyRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_safe(getattr(row, c)) for c in CSV_COLUMNS])
    return out.getvalue()


MANIFEST_COLUMNS = ("path", "age", "sex", "scanner", "split", "label", "study_instance_uid", "modality")


def training_manifest_csv(ctx: WebContext) -> str:
    """Confirmed-normal studies, one row each: the stored series folder of the series the
    model used (storage/<study>/<series>/), age, sex (not stored: blank), station as
    scanner, split=train, label=normal."""
    with ctx.db() as session:
        rows = api.training_manifest(session)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(MANIFEST_COLUMNS)
    storage = Path(ctx.settings.storage_dir)
    for r in rows:
        folder = storage / r.study_instance_uid / r.series_instance_uid
        age = "" if r.age is None else f"{r.age:.1f}"
        writer.writerow([str(folder), age, "", _csv_safe(r.station), "train", "normal", r.study_instance_uid,
                         r.modality or ""])
    return out.getvalue()


def calibration_view(ctx: WebContext) -> dict[str, Any]:
    """Per bundle and scanner: the healthy reference in use, and every site reference."""
    from headscreen.daemon.reference import station_views

    config = ctx.settings.calibration
    with ctx.db() as session:
        counts = api.station_counts(session)
        references = api.list_site_references(session, include_retired=True)
    bundles = ctx.loaded_bundles()
    return {
        "mode": config.mode, "min_references": config.min_references, "grouping": config.grouping,
        "age_bias_min_studies": config.age_min_studies,
        "bundles": [{"bundle_key": b.manifest.key, "modality": b.manifest.modality,
                     "n": len(b.manifest.calibration.reference_scores), "threshold": b.manifest.calibration.threshold,
                     "specificity": b.manifest.calibration.specificity} for b in bundles],
        "stations": station_views(bundles, counts, references, config.mode, config.min_references, config.grouping),
        # The scores themselves stay out of the view: n, threshold and provenance say enough.
        "references": [{k: v for k, v in asdict(r).items() if k not in ("scores", "result_ids")} | {
            "bundle_key": r.bundle_key, "active": r.active} for r in references],
    }


def retire_reference(ctx: WebContext, reference_id: int, reason: str, actor: str) -> None:
    reason = (reason or "").strip()[:MAX_COMMENT]
    if not reason:
        raise HTTPException(status_code=422, detail="retiring a reference needs a reason")
    try:
        with ctx.db() as session:
            api.retire_site_reference(session, reference_id, actor, reason)
    except api.ReferenceNotFound:
        raise HTTPException(status_code=404, detail="no active site reference with that id") from None


class RoleAction(StrEnum):
    SHADOW = "shadow"
    PROMOTE = "promote"
    RETIRE = "retire"


def bundles_view(ctx: WebContext) -> dict[str, Any]:
    """Per modality: the active bundle, its shadows (with the comparison on the studies both
    judged), retired and unassigned bundles; and every recorded role with who, when, why."""
    from headscreen.daemon.shadow import comparisons, current_plan

    with ctx.db() as session:
        plan = current_plan(session, ctx.bundles)
        compared = comparisons(session, plan)
    configured = {s.bundle.key for s in plan.states}
    modalities = []
    for modality in sorted({s.bundle.modality for s in plan.states}):
        states = [s for s in plan.states if s.bundle.modality == modality]
        modalities.append({
            "modality": modality,
            "bundles": [{"key": s.bundle.key, "role": s.role, "default": s.default, "stale": s.stale,
                         "manifest_sha256": s.bundle.manifest_sha256,
                         "changed_at": s.recorded.changed_at if s.recorded else None,
                         "changed_by": s.recorded.changed_by if s.recorded else None,
                         "reason": s.recorded.reason if s.recorded else None} for s in states],
            "active": [b.key for b in plan.active_for(modality)],
            "shadows": [b.key for b in plan.shadows_for(modality)],
            "comparisons": [c for c in compared if c.modality == modality],
        })
    return {
        "modalities": modalities,
        # Roles recorded for bundles this console does not have configured (kept, not used).
        "not_configured": [asdict(r) | {"key": r.key} for r in plan.recorded if r.key not in configured],
    }


def comparisons_view(ctx: WebContext) -> list[Any]:
    from headscreen.daemon.shadow import comparisons, current_plan

    with ctx.db() as session:
        return comparisons(session, current_plan(session, ctx.bundles))


def change_role(ctx: WebContext, key: str, action: RoleAction, reason: str, actor: str,
                old_active: str = "shadow") -> list[Any]:
    """Put a bundle in shadow, promote it, or retire it (admin; audited by db.shadow)."""
    from headscreen.daemon import shadow

    reason = (reason or "").strip()[:MAX_COMMENT]
    if not reason:
        raise HTTPException(status_code=422, detail="a bundle role change needs a reason")
    if old_active not in ("shadow", "retired"):
        raise HTTPException(status_code=422, detail="old_active: shadow or retired")
    try:
        with ctx.db() as session:
            if action is RoleAction.PROMOTE:
                changed = shadow.promote(session, ctx.bundles, key, actor, reason, old_active)  # type: ignore[arg-type]
            elif action is RoleAction.SHADOW:
                changed = shadow.put_in_shadow(session, ctx.bundles, key, actor, reason)
            else:
                changed = shadow.retire(session, ctx.bundles, key, actor, reason)
    except shadow.BundleNotConfigured:
        raise HTTPException(status_code=404, detail="no configured bundle with that key") from None
    except api.RoleConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    logger.info("bundle role action", extra={"action": f"bundle_{action.value}", "bundle": key, "user": actor})
    return changed


@dataclass(frozen=True)
class Attention:
    """One thing on the overview that needs someone: how many, and the list that shows them."""

    key: str
    label: str
    count: int
    href: str
    capped: bool = False  # more than the count (the study count stops at 10,000)


# Each count is taken with the very filters of the list it links to, so the two agree.
ATTENTION_LISTS = (
    ("positives", "screen positives awaiting review", StudyQuery(screen="positive", reviewed="no")),
    ("qc_failures", "QC failures (not eligible) awaiting review", StudyQuery(eligible="no", reviewed="no")),
)


def attention(ctx: WebContext, dead_deliveries: int) -> list[Attention]:
    """The overview's "needs attention" counts, each with the list it links to."""
    items = []
    with ctx.db() as session:
        for key, label, query in ATTENTION_LISTS:
            count, capped = api.count_studies(session, query.to_filters())
            items.append(Attention(key, label, count, f"/studies?{query.query_string()}", capped))
    calibrating = [s for s in calibration_view(ctx)["stations"] if s.in_use == "calibrating"]
    items.append(Attention("calibrating", "stations calibrating (no screen result yet)", len(calibrating),
                           "/calibration?in_use=calibrating"))
    items.append(Attention("dead", "dead deliveries", dead_deliveries, "/failures?show=dead"))
    return items
