"""REST API under /api/v1: everything the pages do, as JSON (OpenAPI at /api/openapi.json)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from headscreen.daemon.web import actions, preview, searches
from headscreen.daemon.web.actions import ReviewAction, RoleAction, jsonable
from headscreen.daemon.web.auth import COOKIE, ApiAdmin, ApiAdminRead, ApiCsrf, ApiUser
from headscreen.daemon.web.context import checked_bundle_key, checked_uid, context_of
from headscreen.daemon.web.filters import SEARCH_MAX_LEN, StudyQuery, study_query
from headscreen.daemon.web.login import Throttled, attempt_login, cookie_secure
from headscreen.daemon.web.redact import for_role
from headscreen.db import api
from headscreen.db import rescreen as rescreen_runs

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["console"])
Query_ = Annotated[StudyQuery, Depends(study_query)]


class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class ReviewBody(BaseModel):
    action: ReviewAction
    comment: str | None = Field(default=None, max_length=actions.MAX_COMMENT)


class RetireBody(BaseModel):
    reason: str = Field(min_length=1, max_length=actions.MAX_COMMENT)


class RoleBody(BaseModel):
    reason: str = Field(min_length=1, max_length=actions.MAX_COMMENT)


class PromoteBody(RoleBody):
    # What the bundle active until now becomes.
    old_active: Literal["shadow", "retired"] = "shadow"


class SearchBody(BaseModel):
    q: str = Field(min_length=1, max_length=SEARCH_MAX_LEN)


class ResendBody(BaseModel):
    delivery_ids: list[int] | None = Field(default=None, max_length=1000)
    study_uid: str | None = Field(default=None, max_length=64, pattern=r"^[0-9.]+$")


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    ctx = context_of(request)
    response.set_cookie(COOKIE, token, max_age=int(ctx.session_lifetime.total_seconds()), httponly=True,
                        samesite="strict", secure=cookie_secure(request), path="/")


@router.post("/login", responses={429: {"description": "too many failed log-ins; see Retry-After"}})
def login(request: Request, body: LoginBody, response: Response) -> dict[str, Any]:
    """Opens a session. No CSRF token is needed: the body must be JSON, which a form on
    another site cannot send. Throttled per account and per address (429, Retry-After)."""
    try:
        opened = attempt_login(request, body.username, body.password)
    except Throttled as exc:
        raise HTTPException(status_code=429, detail="too many failed log-ins; try again later",
                            headers={"Retry-After": str(exc.retry_after_s)}) from None
    if opened is None:
        raise HTTPException(status_code=401, detail="wrong user name or password")
    set_session_cookie(request, response, opened.token)
    return {"username": opened.user.username, "role": opened.user.role, "csrf_token": opened.csrf_token,
            "expires_at": opened.expires_at.isoformat()}


@router.post("/logout")
def logout(request: Request, user: ApiCsrf, response: Response) -> dict[str, bool]:
    with context_of(request).db() as session:
        api.logout(session, user.token, user.username)
    response.delete_cookie(COOKIE, path="/", secure=cookie_secure(request), httponly=True, samesite="strict")
    return {"logged_out": True}


@router.get("/me")
def me(user: ApiUser) -> dict[str, str]:
    return {"username": user.username, "role": user.role, "csrf_token": user.csrf_token}


@router.get("/overview")
def overview(request: Request, user: ApiUser) -> dict[str, Any]:
    ctx = context_of(request)
    with ctx.db() as session:
        view = api.overview(session)
    body: dict[str, Any] = jsonable(view)
    body["attention"] = jsonable(actions.attention(ctx, view.deliveries.get("dead", 0)))
    return body


def _list(request: Request, query: StudyQuery, needs_review: bool = False) -> dict[str, Any]:
    filters = query.to_filters(needs_review=needs_review)
    with context_of(request).db() as session:
        rows = api.list_studies(session, filters)
        total, capped = api.count_studies(session, filters)
    return {"page": query.page, "per_page": query.per_page, "total": total, "total_capped": capped,
            "studies": jsonable(rows)}


@router.post("/searches")
def new_search(request: Request, user: ApiCsrf, body: SearchBody) -> dict[str, Any]:
    """A handle for a search term (accession number, patient ID or Study UID, or the start of
    one), for `find=` on /studies, /studies.csv and /review-queue: the term itself never goes
    into a URL, where proxies and browser history would keep it."""
    return {"find": context_of(request).searches.put(body.q.strip()), "expires_in_s": int(searches.TTL_S)}


@router.get("/studies")
def list_studies(request: Request, user: ApiUser, query: Query_) -> dict[str, Any]:
    return _list(request, query)


@router.get("/studies.csv")
def studies_csv(request: Request, user: ApiUser, query: Query_) -> Response:
    """The filtered list (every page, up to 100,000 rows) as CSV."""
    rows = []
    with context_of(request).db() as session:
        page = 1
        while True:
            filters = StudyQuery(**{**query.__dict__, "page": page, "per_page": 500}).to_filters()
            chunk = api.list_studies(session, filters)
            rows.extend(chunk)
            if len(chunk) < 500 or len(rows) >= 100_000:
                break
            page += 1
    with context_of(request).db() as session:
        api.audit(session, user.username, "export_studies_csv", detail={"rows": len(rows)})
    return Response(actions.studies_csv(rows), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="studies.csv"'})


@router.get("/review-queue")
def review_queue(request: Request, user: ApiUser, query: Query_) -> dict[str, Any]:
    """QC failures and screen-positive studies not yet reviewed."""
    return _list(request, query, needs_review=True)


@router.get("/studies/{study_uid}")
def study(request: Request, user: ApiUser, study_uid: str) -> dict[str, Any]:
    ctx = context_of(request)
    detail = actions.study_detail(ctx, checked_uid(study_uid))
    out: dict[str, Any] = jsonable(for_role(user, detail))
    out.pop("patient_birth_date", None)
    out["previews"] = [f"/api/v1/studies/{study_uid}/previews/{sop}.png" for _, sop in preview.sc_objects(ctx, detail)]
    with ctx.db() as session:
        out["shadow_results"] = jsonable(for_role(user, api.shadow_results_of_study(session, detail.row.study_id)))
    return out


@router.get("/studies/{study_uid}/audit")
def study_audit(request: Request, user: ApiUser, study_uid: str) -> list[dict[str, Any]]:
    with context_of(request).db() as session:
        entries: list[dict[str, Any]] = jsonable(for_role(user, api.audit_trail(session, checked_uid(study_uid))))
    return entries


@router.get("/studies/{study_uid}/previews/{sop_uid}.png", response_class=Response)
def study_preview(request: Request, user: ApiUser, study_uid: str, sop_uid: str) -> Response:
    ctx = context_of(request)
    detail = actions.study_detail(ctx, checked_uid(study_uid))
    png = preview.render_png(ctx, detail, checked_uid(sop_uid))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.post("/studies/{study_uid}/review")
def study_review(request: Request, user: ApiAdmin, study_uid: str, body: ReviewBody) -> dict[str, Any]:
    actions.review(context_of(request), checked_uid(study_uid), body.action, body.comment, user.username)
    return {"ok": True, "action": body.action.value}


@router.post("/studies/{study_uid}/requeue")
def study_requeue(request: Request, user: ApiAdmin, study_uid: str) -> dict[str, Any]:
    job_ids = actions.requeue(context_of(request), checked_uid(study_uid), user.username)
    return {"job_ids": job_ids}


@router.get("/failures")
def failures(request: Request, user: ApiUser) -> dict[str, Any]:
    """Failed jobs and dead deliveries; a viewer's last_error holds only the error's category."""
    with context_of(request).db() as session:
        jobs, dead = api.failures(session)
    return {"failed_jobs": jsonable(for_role(user, jobs)), "dead_deliveries": jsonable(for_role(user, dead))}


@router.post("/deliveries/resend")
def resend(request: Request, user: ApiAdmin, body: ResendBody) -> dict[str, int]:
    count = actions.resend(context_of(request), user.username, body.delivery_ids, body.study_uid)
    return {"requeued": count}


@router.get("/drift")
def drift(request: Request, user: ApiUser, period_days: int = 7, modality: str | None = None,
          days: int = 180) -> list[dict[str, Any]]:
    """Current results per station and period over the last `days` days."""
    if not 1 <= period_days <= 92 or not 1 <= days <= 3660:
        raise HTTPException(status_code=422, detail="period_days: 1..92, days: 1..3660")
    if modality not in (None, "CT", "MR"):
        raise HTTPException(status_code=422, detail="modality: CT or MR")
    with context_of(request).db() as session:
        since = api.utcnow() - timedelta(days=days)
        buckets: list[dict[str, Any]] = jsonable(api.score_distributions(session, period_days=period_days,
                                                                          since=since, modality=modality))
    return buckets


@router.get("/audit")
def audit(request: Request, user: ApiUser) -> list[dict[str, Any]]:
    with context_of(request).db() as session:
        entries: list[dict[str, Any]] = jsonable(for_role(user, api.audit_trail(session)))
    return entries


@router.get("/training-manifest.csv")
def training_manifest(request: Request, user: ApiAdminRead) -> Response:
    """Confirmed-normal studies as a training manifest (admin: it names storage paths)."""
    ctx = context_of(request)
    text = actions.training_manifest_csv(ctx)
    with ctx.db() as session:
        api.audit(session, user.username, "export_training_manifest", detail={"rows": text.count("\n") - 1})
    return Response(text, media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="training-manifest.csv"'})


@router.get("/calibration")
def calibration(request: Request, user: ApiUser) -> dict[str, Any]:
    """Per bundle and scanner: the healthy reference in use (bundle, site or calibrating),
    n, threshold, provenance, and how many healthy studies a calibrating scanner needs."""
    body: dict[str, Any] = jsonable(actions.calibration_view(context_of(request)))
    return body


@router.post("/calibration/references/{reference_id}/retire")
def calibration_retire(request: Request, user: ApiAdmin, reference_id: int, body: RetireBody) -> dict[str, Any]:
    actions.retire_reference(context_of(request), reference_id, body.reason, user.username)
    return {"retired": reference_id}


def comparison_json(comparison: Any) -> dict[str, Any]:
    body: dict[str, Any] = jsonable(comparison)
    body["disagree"] = comparison.disagree
    body["disagreements"] = [d | {"study": f"/studies/{d['study_instance_uid']}"} for d in body["disagreements"]]
    return body


@router.get("/bundles")
def bundles(request: Request, user: ApiUser) -> dict[str, Any]:
    """Per modality: the active bundle (its results are sent), shadow bundles (recorded only),
    retired and unassigned ones, who set each role, when and why; with the comparisons."""
    view = actions.bundles_view(context_of(request))
    for modality in view["modalities"]:
        modality["comparisons"] = [comparison_json(c) for c in modality["comparisons"]]
    body: dict[str, Any] = jsonable(view)
    return body


@router.get("/bundles/compare")
def bundles_compare(request: Request, user: ApiUser) -> list[dict[str, Any]]:
    """Each modality's active bundle against each shadow bundle on the same studies: how many
    both judged, screen agreement, Spearman rank correlation of scores, each one's share of
    positives, and the studies where they disagree."""
    return [comparison_json(c) for c in actions.comparisons_view(context_of(request))]


@router.post("/bundles/{key}/shadow")
def bundle_shadow(request: Request, user: ApiAdmin, key: str, body: RoleBody) -> dict[str, Any]:
    changed = actions.change_role(context_of(request), checked_bundle_key(key), RoleAction.SHADOW, body.reason,
                                  user.username)
    return {"changed": jsonable(changed)}


@router.post("/bundles/{key}/promote")
def bundle_promote(request: Request, user: ApiAdmin, key: str, body: PromoteBody) -> dict[str, Any]:
    """Make a shadow bundle active for its modality; jobs claimed from now on use it."""
    changed = actions.change_role(context_of(request), checked_bundle_key(key), RoleAction.PROMOTE, body.reason,
                                  user.username, body.old_active)
    return {"changed": jsonable(changed)}


@router.post("/bundles/{key}/retire")
def bundle_retire(request: Request, user: ApiAdmin, key: str, body: RoleBody) -> dict[str, Any]:
    changed = actions.change_role(context_of(request), checked_bundle_key(key), RoleAction.RETIRE, body.reason,
                                  user.username)
    return {"changed": jsonable(changed)}


@router.get("/rescreen")
def rescreen(request: Request, user: ApiUser) -> list[dict[str, Any]]:
    """Archive re-screening runs (`headscreen rescreen`): query, state, studies per state and
    how many are finished; for an admin also the failed studies and why."""
    with context_of(request).db() as session:
        runs = rescreen_runs.list_runs(session)
        listed: list[dict[str, Any]] = []
        for run in runs:
            row = jsonable(run) | {"found": run.found, "finished": run.finished_items}
            if user.is_admin and run.counts.get("failed"):
                row["failed_studies"] = [{"study_uid": uid, "reason": why}
                                         for uid, why in rescreen_runs.failed_items(session, run.run_id)]
            listed.append(row)
    return listed

