"""Server-rendered pages. Forms post back with the session's CSRF token and are
answered with a redirect (post/redirect/get)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from headscreen.daemon.web import actions, charts, login, preview
from headscreen.daemon.web.actions import ReviewAction, RoleAction
from headscreen.daemon.web.auth import COOKIE, PageAdmin, PageCsrf, PageUser, Principal
from headscreen.daemon.web.context import checked_bundle_key, checked_uid, context_of
from headscreen.daemon.web.filters import StudyQuery, search_target, study_query
from headscreen.daemon.web.redact import for_role
from headscreen.daemon.web.rest import set_session_cookie
from headscreen.db import api
from headscreen.db import rescreen as rescreen_runs
from headscreen.imaging.preprocess import default_params

logger = logging.getLogger(__name__)

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _dicom_date(value: str | None) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is, "-" when absent."""
    if not value:
        return "-"
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


templates.env.filters["da"] = _dicom_date
router = APIRouter(include_in_schema=False)
Query_ = Annotated[StudyQuery, Depends(study_query)]


def _render(request: Request, name: str, user: Principal | None, status_code: int = 200, **values: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": user, **values}, status_code=status_code)


def _safe_next(path: str | None) -> str:
    # Only local paths: an open redirect would let a link send users elsewhere after login.
    return path if path and path.startswith("/") and not path.startswith("//") else "/"


def _login_page(request: Request, next_path: str, error: str | None, status_code: int = 200) -> HTMLResponse:
    nonce, token = login.login_csrf(request)
    response = _render(request, "login.html", None, status_code=status_code, next=_safe_next(next_path),
                       error=error, csrf_token=token)
    login.set_login_csrf_cookie(request, response, nonce)
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return _login_page(request, next, None)


@router.post("/login")
def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=512)] = "/",
    csrf_token: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    # Checked before anything else: a form posted from another site must not log anyone in.
    if not login.login_csrf_ok(request, csrf_token):
        return _login_page(request, next, "The log-in form had expired. Please log in again.", status_code=403)
    try:
        opened = login.attempt_login(request, username, password)
    except login.Throttled as exc:
        page = _login_page(request, next, "Too many failed log-ins. Please wait "
                           f"{exc.retry_after_s} s and try again.", status_code=429)
        page.headers["Retry-After"] = str(exc.retry_after_s)
        return page
    if opened is None:
        return _login_page(request, next, "Wrong user name or password.", status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(request, response, opened.token)
    response.delete_cookie(login.LOGIN_CSRF_COOKIE, path="/login", secure=login.cookie_secure(request),
                           httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request, user: PageCsrf) -> Response:
    with context_of(request).db() as session:
        api.logout(session, user.token, user.username)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", secure=login.cookie_secure(request), httponly=True, samesite="strict")
    return response


@router.get("/")
def overview(request: Request, user: PageUser) -> HTMLResponse:
    with context_of(request).db() as session:
        view = api.overview(session)
    days = [d.day for d in view.days]
    counts_chart = charts.bar_chart(days, {
        "received": [d.received for d in view.days],
        "results": [d.results for d in view.days],
        "failed": [d.failed for d in view.days],
    }, title="Studies received, results (throughput), failures per day")
    latency = {d: s for d, s, _ in view.latency_s}
    latency_chart = charts.line_chart(days, {"mean latency": [latency.get(d) for d in days]},
                                      title="Latency: last instance received -> result (s)", unit=" s")
    return _render(request, "overview.html", user, view=view, counts_chart=Markup(counts_chart),
                   latency_chart=Markup(latency_chart), health=_health(request),
                   attention=actions.attention(context_of(request), view.deliveries.get("dead", 0)))


def _health(request: Request) -> dict[str, Any]:
    from headscreen.daemon.web.health import health_report

    return health_report(context_of(request))


@router.get("/studies")
def studies(request: Request, user: PageUser, query: Query_) -> HTMLResponse:
    return _study_list(request, user, query, "studies.html", needs_review=False)


@router.get("/review")
def review_queue(request: Request, user: PageUser, query: Query_) -> HTMLResponse:
    return _study_list(request, user, query, "review.html", needs_review=True)


@router.post("/studies/search")
async def search(request: Request, user: PageCsrf) -> RedirectResponse:
    """The filter form posts here; the list it redirects to carries a handle for the search
    term, never the term (daemon.web.searches)."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    back = "/review" if form.get("back") == "/review" else "/studies"
    target = search_target(form, context_of(request).searches)
    return RedirectResponse(f"{back}?{target}" if target else back, status_code=303)


def _study_list(request: Request, user: Principal, query: StudyQuery, template: str,
                needs_review: bool) -> HTMLResponse:
    filters = query.to_filters(needs_review=needs_review)
    with context_of(request).db() as session:
        rows = api.list_studies(session, filters)
        total, capped = api.count_studies(session, filters)
    pages = max(1, -(-total // query.per_page))
    return _render(request, template, user, rows=rows, query=query, total=total, capped=capped, pages=pages)


@router.get("/studies/{study_uid}")
def study(request: Request, user: PageUser, study_uid: str) -> HTMLResponse:
    ctx = context_of(request)
    detail = for_role(user, actions.study_detail(ctx, checked_uid(study_uid)))
    with ctx.db() as session:
        trail = for_role(user, api.audit_trail(session, study_uid))
        shadows = for_role(user, api.shadow_results_of_study(session, detail.row.study_id))
    current = next((r for r in reversed(detail.results) if not r.superseded), None)
    ranges = _qc_ranges(request, current, detail.row.modality)
    previews = [f"/api/v1/studies/{study_uid}/previews/{quote(sop)}.png" for _, sop in preview.sc_objects(ctx, detail)]
    return _render(request, "study.html", user, d=detail, current=current, trail=trail, ranges=ranges,
                   previews=previews, actions=list(ReviewAction),
                   shadows=[s for s in shadows if current is not None and s.result_id == current.result_id])


def _qc_ranges(request: Request, result: api.ResultSummaryRow | None,
               modality: str | None) -> dict[str, tuple[float, float]]:
    """metric -> (low, high): the plausible ranges of the bundle that produced the result
    (its manifest's preprocessing.qc_ranges), else the preprocessing defaults."""
    params: dict[str, Any] = {}
    if result is not None:
        params = context_of(request).preprocessing_of(result.bundle_name, result.bundle_version) or {}
    if not params and modality in ("CT", "MR"):
        params = default_params(modality)
    qc = params.get("qc_ranges", {})
    return {key: (float(value[0]), float(value[1])) for key, value in qc.items()
            if isinstance(value, (list, tuple)) and len(value) == 2}


@router.post("/studies/{study_uid}/review")
def study_review(
    request: Request,
    user: PageAdmin,
    study_uid: str,
    action: Annotated[ReviewAction, Form()],
    comment: Annotated[str, Form(max_length=actions.MAX_COMMENT)] = "",
    back: Annotated[str, Form(max_length=512)] = "",
) -> Response:
    actions.review(context_of(request), checked_uid(study_uid), action, comment, user.username)
    return RedirectResponse(_safe_next(back) if back else f"/studies/{study_uid}", status_code=303)


@router.post("/studies/{study_uid}/requeue")
def study_requeue(request: Request, user: PageAdmin, study_uid: str) -> Response:
    actions.requeue(context_of(request), checked_uid(study_uid), user.username)
    return RedirectResponse(f"/studies/{study_uid}", status_code=303)


@router.get("/failures")
def failures(request: Request, user: PageUser, show: Literal["jobs", "dead"] | None = None) -> HTMLResponse:
    """Failed jobs and dead deliveries; `show=jobs` or `show=dead` lists one of the two."""
    with context_of(request).db() as session:
        jobs, dead = api.failures(session)
    return _render(request, "failures.html", user, jobs=for_role(user, jobs), dead=for_role(user, dead),
                   show=show)


@router.post("/deliveries/resend")
async def resend(request: Request, user: PageAdmin) -> Response:
    form = await request.form()
    try:
        ids = [int(str(v)) for v in form.getlist("delivery_id")]
    except ValueError:
        raise HTTPException(status_code=422, detail="delivery_id: integers") from None
    actions.resend(context_of(request), user.username, ids or None, None)
    return RedirectResponse("/failures", status_code=303)


@router.get("/drift")
def drift(request: Request, user: PageUser, period_days: int = 7, modality: str | None = None) -> HTMLResponse:
    if not 1 <= period_days <= 92 or modality not in (None, "CT", "MR"):
        raise HTTPException(status_code=422, detail="period_days 1..92, modality CT or MR")
    with context_of(request).db() as session:
        buckets = api.score_distributions(session, period_days=period_days, modality=modality)
    periods = sorted({b.period for b in buckets})
    stations = sorted({b.station for b in buckets})
    by_key = {(b.station, b.period): b for b in buckets}
    chart = charts.line_chart(periods, {
        s: [by_key[(s, p)].mean_percentile if (s, p) in by_key else None for p in periods] for s in stations
    }, title="Mean score percentile per station", y_max=100)
    positive_chart = charts.line_chart(periods, {
        s: [100.0 * by_key[(s, p)].positives / by_key[(s, p)].count if (s, p) in by_key else None for p in periods]
        for s in stations
    }, title="Screen-positive rate per station (%)", unit="%")
    return _render(request, "drift.html", user, buckets=buckets, chart=Markup(chart),
                   positive_chart=Markup(positive_chart), period_days=period_days, modality=modality)


@router.get("/calibration")
def calibration(request: Request, user: PageUser,
                in_use: Literal["calibrating", "site", "bundle"] | None = None) -> HTMLResponse:
    """References per scanner; `in_use=calibrating|site|bundle` lists only the scanners judged so."""
    view = actions.calibration_view(context_of(request))
    if in_use:
        view["stations"] = [s for s in view["stations"] if s.in_use == in_use]
    return _render(request, "calibration.html", user, view=view, in_use=in_use)


@router.post("/calibration/references/{reference_id}/retire")
def calibration_retire(
    request: Request,
    user: PageAdmin,
    reference_id: int,
    reason: Annotated[str, Form(max_length=actions.MAX_COMMENT)] = "",
) -> Response:
    actions.retire_reference(context_of(request), reference_id, reason, user.username)
    return RedirectResponse("/calibration", status_code=303)


@router.get("/bundles")
def bundles(request: Request, user: PageUser) -> HTMLResponse:
    return _render(request, "bundles.html", user, view=actions.bundles_view(context_of(request)))


def _role_form(request: Request, user: Principal, key: str, action: RoleAction, reason: str,
               old_active: str = "shadow") -> Response:
    actions.change_role(context_of(request), checked_bundle_key(key), action, reason, user.username, old_active)
    return RedirectResponse("/bundles", status_code=303)


@router.post("/bundles/{key}/promote")
def bundle_promote(
    request: Request, user: PageAdmin, key: str,
    reason: Annotated[str, Form(max_length=actions.MAX_COMMENT)] = "",
    old_active: Annotated[str, Form(max_length=16)] = "shadow",
) -> Response:
    return _role_form(request, user, key, RoleAction.PROMOTE, reason, old_active)


@router.post("/bundles/{key}/shadow")
def bundle_shadow(request: Request, user: PageAdmin, key: str,
                  reason: Annotated[str, Form(max_length=actions.MAX_COMMENT)] = "") -> Response:
    return _role_form(request, user, key, RoleAction.SHADOW, reason)


@router.post("/bundles/{key}/retire")
def bundle_retire(request: Request, user: PageAdmin, key: str,
                  reason: Annotated[str, Form(max_length=actions.MAX_COMMENT)] = "") -> Response:
    return _role_form(request, user, key, RoleAction.RETIRE, reason)


@router.get("/rescreen")
def rescreen(request: Request, user: PageUser) -> HTMLResponse:
    """Archive re-screening runs and how far each got; an admin also sees why studies failed."""
    now = api.utcnow()
    with context_of(request).db() as session:
        runs = rescreen_runs.list_runs(session)
        failed = {r.run_id: rescreen_runs.failed_items(session, r.run_id, limit=50)
                  for r in runs if r.counts.get("failed") and user.is_admin}
    # A running run writes at least every few seconds; one silent for minutes was killed.
    stale = {r.run_id: int((now - r.updated_at).total_seconds() // 60) for r in runs
             if r.state == "running" and (now - r.updated_at).total_seconds() > 120}
    return _render(request, "rescreen.html", user, runs=runs, failed=failed, stale=stale)
