"""The admin console over FastAPI's TestClient on real databases: authorization,
CSRF, every endpoint, filters, bad input, exports, previews, health and metrics."""

from __future__ import annotations

import csv
import io
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from db_factories import BUNDLES
from headscreen.daemon.web import start_web_server
from headscreen.db import api
from headscreen.db.models import Delivery, Job
from web_helpers import ADMIN, CSRF, VIEWER, Console, Seeded, login_form_token

READ_ENDPOINTS = [
    "/api/v1/me", "/api/v1/overview", "/api/v1/studies", "/api/v1/studies.csv", "/api/v1/review-queue",
    "/api/v1/failures", "/api/v1/drift", "/api/v1/audit", "/api/v1/training-manifest.csv",
]
PAGES = ["/", "/studies", "/review", "/failures", "/drift"]


def _study_endpoints(seeded: Seeded) -> list[str]:
    uid = seeded.positive
    return [f"/api/v1/studies/{uid}", f"/api/v1/studies/{uid}/audit",
            f"/api/v1/studies/{uid}/previews/{seeded.sc_sop_uid}.png"]


def _actions(seeded: Seeded) -> list[tuple[str, dict | None]]:
    uid = seeded.positive
    return [
        (f"/api/v1/studies/{uid}/review", {"action": "flag", "comment": "look"}),
        (f"/api/v1/studies/{uid}/requeue", None),
        ("/api/v1/deliveries/resend", {"delivery_ids": seeded.dead_delivery_ids}),
    ]


# --- authorization -----------------------------------------------------------------

def test_anonymous_sees_nothing_and_changes_nothing(console: Console) -> None:
    client = console.client()
    before = console.audit_count()
    for path in READ_ENDPOINTS + _study_endpoints(console.seeded):
        response = client.get(path)
        assert response.status_code == 401, path
        assert console.seeded.positive not in response.text
    for path in PAGES + [f"/studies/{console.seeded.positive}"]:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    for path, body in _actions(console.seeded):
        assert client.post(path, json=body).status_code == 401, path
    page_post = client.post(f"/studies/{console.seeded.positive}/review", data={"action": "flag", "comment": "x"})
    assert page_post.status_code == 303 and page_post.headers["location"].startswith("/login")
    assert console.audit_count() == before
    assert not console.study(console.seeded.positive).flagged


def test_viewer_reads_but_cannot_act(console: Console) -> None:
    client = console.client(VIEWER)
    for path in [p for p in READ_ENDPOINTS if "training-manifest" not in p] + _study_endpoints(console.seeded):
        assert client.get(path).status_code == 200, path
    for path in PAGES + [f"/studies/{console.seeded.positive}"]:
        assert client.get(path).status_code == 200, path
    assert client.get("/api/v1/training-manifest.csv").status_code == 403
    before = console.audit_count()
    for path, body in _actions(console.seeded):
        assert client.post(path, json=body).status_code == 403, path
    csrf = client.headers[CSRF]
    page = client.post(f"/studies/{console.seeded.positive}/review",
                       data={"action": "flag", "comment": "x", "csrf_token": csrf})
    assert page.status_code == 403
    assert console.audit_count() == before
    assert not console.study(console.seeded.positive).flagged
    with console.sessions() as session:
        states = {d.state for d in session.execute(select(Delivery)).scalars()}
    assert "dead" in {str(s) for s in states}  # nothing was re-sent


def test_admin_flags_and_the_audit_trail_names_the_user(console_any_db: Console) -> None:
    console = console_any_db
    uid = console.seeded.positive
    client = console.client(ADMIN)
    response = client.post(f"/api/v1/studies/{uid}/review", json={"action": "flag", "comment": "check the bleed"})
    assert response.status_code == 200
    study = console.study(uid)
    assert study.flagged and study.flag_comment == "check the bleed"
    trail = client.get(f"/api/v1/studies/{uid}/audit").json()
    assert trail[0]["actor"] == ADMIN[0] and trail[0]["action"] == "flag_set"
    assert trail[0]["detail"]["comment"] == "check the bleed"
    queue = client.get("/api/v1/review-queue").json()["studies"]
    assert {r["study_instance_uid"]: r["flag_comment"] for r in queue}[uid] == "check the bleed"


def test_missing_or_wrong_csrf_is_refused_and_changes_nothing(console: Console) -> None:
    client = console.client(ADMIN)
    uid = console.seeded.positive
    before = console.audit_count()
    token = client.headers.pop(CSRF)
    assert client.post(f"/api/v1/studies/{uid}/review", json={"action": "flag", "comment": "x"}).status_code == 403
    wrong = {CSRF: token[:-2] + "xx"}
    assert client.post(f"/api/v1/studies/{uid}/requeue", headers=wrong).status_code == 403
    assert client.post(f"/studies/{uid}/review", data={"action": "flag", "comment": "x"}).status_code == 403
    assert client.post(f"/studies/{uid}/review",
                       data={"action": "flag", "comment": "x", "csrf_token": "nope"}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert console.audit_count() == before
    assert not console.study(uid).flagged


# --- login and sessions --------------------------------------------------------------

def test_login_cookie_is_httponly_strict_and_logout_ends_it(console: Console) -> None:
    client = console.client()
    response = client.post("/api/v1/login", json={"username": ADMIN[0], "password": ADMIN[1]})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=28800" in cookie
    csrf = response.json()["csrf_token"]
    assert client.get("/api/v1/me").json()["username"] == ADMIN[0]
    assert client.post("/api/v1/logout", headers={CSRF: csrf}).status_code == 200
    client.cookies.set("hs_session", response.cookies["hs_session"])  # replaying the old token
    assert client.get("/api/v1/me").status_code == 401


def test_wrong_password_is_refused_and_audited(console: Console) -> None:
    client = console.client()
    response = client.post("/api/v1/login", json={"username": ADMIN[0], "password": "wrong-password"})
    assert response.status_code == 401 and "set-cookie" not in response.headers
    page = client.post("/login", data={"username": "nobody", "password": "x", "csrf_token": login_form_token(client)})
    assert page.status_code == 401 and "Wrong user name or password" in page.text
    trail = client.post("/api/v1/login", json={"username": ADMIN[0], "password": ADMIN[1]})
    client.headers[CSRF] = trail.json()["csrf_token"]
    actions = [(e["actor"], e["action"]) for e in client.get("/api/v1/audit").json()]
    assert (ADMIN[0], "login_failed") in actions and ("nobody", "login_failed") in actions


def test_expired_session_is_refused(console: Console) -> None:
    with console.sessions() as session:
        old = api.login(session, ADMIN[0], ADMIN[1], timedelta(hours=1), now=api.utcnow() - timedelta(hours=2))
    assert old is not None
    client = console.client()
    client.cookies.set("hs_session", old.token)
    assert client.get("/api/v1/me").status_code == 401
    assert client.get("/").status_code == 303


def test_page_login_redirects_only_to_local_paths(console: Console) -> None:
    client = console.client()
    token = login_form_token(client)
    ok = client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "next": "/review",
                                     "csrf_token": token})
    assert ok.status_code == 303 and ok.headers["location"] == "/review"
    token = login_form_token(client)
    evil = client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "next": "//evil.example/x",
                                       "csrf_token": token})
    assert evil.headers["location"] == "/"


# --- study list: filters, sorting, pagination -------------------------------------------

def _uids(client: TestClient, query: str, path: str = "/api/v1/studies") -> list[str]:
    response = client.get(f"{path}?{query}")
    assert response.status_code == 200, response.text
    return [r["study_instance_uid"] for r in response.json()["studies"]]


def test_filters_narrow_the_list(console_any_db: Console) -> None:
    console = console_any_db
    s = console.seeded
    client = console.client(VIEWER)
    assert len(_uids(client, "")) == 6
    assert _uids(client, "modality=MR") == [s.qc_failed]
    assert _uids(client, "screen=positive") == [s.positive]
    assert _uids(client, "min_percentile=90") == [s.positive]
    assert set(_uids(client, "min_percentile=50&max_percentile=90")) == {s.qc_failed, s.dead_delivery}
    assert _uids(client, "min_age_gap=10&max_age_gap=20") == [s.qc_failed]
    assert _uids(client, "qc_failed=yes") == [s.qc_failed]
    assert _uids(client, "qc_reason=registration") == [s.qc_failed]
    assert set(_uids(client, "station=CT-NORTH")) == {s.positive, s.failed_job, s.receiving}
    assert _uids(client, "state=receiving") == [s.receiving]
    today = api.utcnow().date()
    assert len(_uids(client, f"received_from={today - timedelta(days=1)}&received_to={today}")) == 6
    assert _uids(client, f"received_to={today - timedelta(days=2)}") == []
    assert _uids(client, "state=&modality=&qc_reason=") == _uids(client, "")  # blank fields: no filter


def test_sorting_and_pagination(console_any_db: Console) -> None:
    console = console_any_db
    s = console.seeded
    client = console.client(VIEWER)
    by_pct = _uids(client, "sort=percentile&order=desc")
    assert by_pct[:4] == [s.positive, s.qc_failed, s.dead_delivery, s.negative]  # no-result studies last
    assert _uids(client, "sort=percentile&order=asc")[:2] == [s.negative, s.dead_delivery]
    newest = _uids(client, "")
    assert newest[0] == s.receiving
    pages = [_uids(client, f"per_page=2&page={p}") for p in (1, 2, 3, 4)]
    assert sum(pages, []) == newest and pages[3] == []
    body = client.get("/api/v1/studies?per_page=2").json()
    assert body["total"] == 6 and body["total_capped"] is False


@pytest.mark.parametrize("query", [
    "min_percentile=abc", "min_percentile=101", "sort=name;DROP TABLE studies", "state=done",
    "state=complete' OR '1'='1", "received_from=2026-13-01", "per_page=0", "page=-1", "modality=CT%00",
    "min_percentile=90&max_percentile=10", "received_from=2026-02-01&received_to=2026-01-01",
    "qc_failed=maybe", "qc_reason=" + "x" * 65,
])
def test_malformed_filters_are_4xx_and_change_nothing(console: Console, query: str) -> None:
    client = console.client(ADMIN)
    before = console.audit_count()
    response = client.get(f"/api/v1/studies?{query}")
    assert response.status_code == 422, (query, response.text)
    assert client.get(f"/studies?{query}").status_code == 422
    assert console.audit_count() == before


@pytest.mark.parametrize("field", ["station", "qc_reason"])
def test_injection_text_in_free_filters_is_only_data(console_any_db: Console, field: str) -> None:
    console = console_any_db
    client = console.client(ADMIN)
    for attack in ["' OR '1'='1", "x'; DROP TABLE studies; --", "%", "\\", "\" OR 1=1 --"]:
        response = client.get("/api/v1/studies", params={field: attack})
        assert response.status_code == 200
        assert response.json()["studies"] == [], attack
    # LIKE wildcards are escaped: "_" matches a literal underscore only (registration_failed).
    underscore = [r["study_instance_uid"] for r in client.get("/api/v1/studies", params={field: "_"}).json()["studies"]]
    assert underscore == ([console.seeded.qc_failed] if field == "qc_reason" else [])
    assert len(_uids(client, "")) == 6  # the table is intact


def test_unknown_or_malformed_study_uids_are_404(console: Console) -> None:
    client = console.client(ADMIN)
    for uid in ["1.2.3.999", "1.2.3' OR 1=1", "..%2F..%2Fetc", "1" * 70]:
        assert client.get(f"/api/v1/studies/{uid}").status_code == 404, uid
        assert client.post(f"/api/v1/studies/{uid}/review", json={"action": "flag", "comment": "x"}).status_code == 404
    assert client.get("/studies/1.2.3.999").status_code == 404
    assert client.post(f"/api/v1/studies/{console.seeded.positive}/review",
                       json={"action": "explode"}).status_code == 422
    assert client.post(f"/api/v1/studies/{console.seeded.positive}/review",
                       json={"action": "flag"}).status_code == 422  # a flag needs a comment


# --- review actions, requeue, resend -------------------------------------------------

def test_review_actions_move_studies_out_of_the_queue(console: Console) -> None:
    s = console.seeded
    client = console.client(ADMIN)
    assert set(_uids(client, "", "/api/v1/review-queue")) == {s.positive, s.qc_failed}
    response = client.post(f"/api/v1/studies/{s.positive}/review", json={"action": "confirm", "comment": "bleed"})
    assert response.status_code == 200
    assert client.post(f"/api/v1/studies/{s.qc_failed}/review", json={"action": "dismiss"}).status_code == 200
    assert _uids(client, "", "/api/v1/review-queue") == []
    positive, dismissed = console.study(s.positive), console.study(s.qc_failed)
    assert positive.reviewed and positive.flagged and not positive.confirmed_normal
    assert dismissed.reviewed and not dismissed.flagged
    assert _uids(client, "reviewed=yes&sort=percentile") == [s.positive, s.qc_failed]


def test_confirmed_normal_studies_form_the_training_manifest(console: Console) -> None:
    s = console.seeded
    client = console.client(ADMIN)
    empty = client.get("/api/v1/training-manifest.csv")
    assert empty.text.splitlines() == ["path,age,sex,scanner,split,label,study_instance_uid,modality"]
    assert client.post(f"/api/v1/studies/{s.negative}/review", json={"action": "normal"}).status_code == 200
    rows = list(csv.DictReader(io.StringIO(client.get("/api/v1/training-manifest.csv").text)))
    assert len(rows) == 1
    row = rows[0]
    detail = client.get(f"/api/v1/studies/{s.negative}").json()
    series_uid = detail["results"][0]["selected_series_uid"]
    assert row["path"] == str(console.settings.storage_dir / s.negative / series_uid)
    assert ((row["age"], row["scanner"], row["split"], row["label"], row["modality"])
            == ("54.0", "CT-SOUTH", "train", "normal", "CT"))
    assert console.study(s.negative).confirmed_normal


def test_failures_requeue_and_resend(console: Console) -> None:
    s = console.seeded
    client = console.client(ADMIN)
    failures = client.get("/api/v1/failures").json()
    assert [j["study_instance_uid"] for j in failures["failed_jobs"]] == [s.failed_job]
    assert "no brain found" in failures["failed_jobs"][0]["last_error"]
    assert {d["delivery_id"] for d in failures["dead_deliveries"]} == set(s.dead_delivery_ids)
    job_ids = client.post(f"/api/v1/studies/{s.failed_job}/requeue").json()["job_ids"]
    assert len(job_ids) == 1
    resent = client.post("/api/v1/deliveries/resend", json={"delivery_ids": s.dead_delivery_ids})
    assert resent.json() == {"requeued": 1}
    after = client.get("/api/v1/failures").json()
    assert after == {"failed_jobs": [], "dead_deliveries": []}
    with console.sessions() as session:
        assert str(session.get(Job, job_ids[0]).state) == "queued"  # type: ignore[union-attr]
        assert str(session.get(Delivery, s.dead_delivery_ids[0]).state) == "pending"  # type: ignore[union-attr]
    actions = [e["action"] for e in client.get("/api/v1/audit").json() if e["actor"] == ADMIN[0]]
    assert "study_requeued" in actions and "resend_dead" in actions


def test_page_forms_act_with_csrf_and_redirect(console: Console) -> None:
    s = console.seeded
    client = console.client(ADMIN)
    csrf = client.headers.pop(CSRF)
    response = client.post(f"/studies/{s.positive}/review",
                           data={"action": "flag", "comment": "page flag", "csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == f"/studies/{s.positive}"
    assert console.study(s.positive).flag_comment == "page flag"
    resend = client.post("/deliveries/resend", data={"delivery_id": s.dead_delivery_ids, "csrf_token": csrf})
    assert resend.status_code == 303
    requeue = client.post(f"/studies/{s.failed_job}/requeue", data={"csrf_token": csrf})
    assert requeue.status_code == 303
    page = client.get(f"/studies/{s.positive}").text
    assert "page flag" in page and "flag_set" in page


# --- pages, exports, previews -----------------------------------------------------------

def test_pages_render_their_content(console: Console) -> None:
    s = console.seeded
    client = console.client(ADMIN)
    overview = client.get("/").text
    assert overview.count("<svg") == 2 and "Workers and queue" in overview
    study = client.get(f"/studies/{s.qc_failed}").text
    assert "registration_failed" in study and "OUT" in study  # head_similarity 0.1 is outside [0.3, 1]
    assert "+12.0 y" in study and "axial head" in study
    positive = client.get(f"/studies/{s.positive}").text
    assert f"/api/v1/studies/{s.positive}/previews/{s.sc_sop_uid}.png" in positive
    assert s.failed_job in client.get("/failures").text
    drift = client.get("/drift").text
    assert "CT-NORTH" in drift and "<svg" in drift
    response = client.get("/studies")
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_csv_export_of_the_filtered_list(console: Console) -> None:
    client = console.client(VIEWER)
    response = client.get("/api/v1/studies.csv?modality=CT&sort=percentile")
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["study_instance_uid"] for r in rows][:1] == [console.seeded.positive]
    assert len(rows) == 5 and {r["modality"] for r in rows} == {"CT"}
    assert rows[0]["percentile"] == "99.4" and rows[0]["screen_positive"] == "True"


def test_overlay_preview_is_a_png_of_the_sc(console: Console) -> None:
    s = console.seeded
    client = console.client(VIEWER)
    response = client.get(f"/api/v1/studies/{s.positive}/previews/{s.sc_sop_uid}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((32, 32))[1] == 200  # the green square of the overlay
    assert client.get(f"/api/v1/studies/{s.negative}/previews/{s.sc_sop_uid}.png").status_code == 404
    assert client.get(f"/api/v1/studies/{s.positive}/previews/1.2.3.png").status_code == 404


# --- operations -----------------------------------------------------------------------

def test_healthz_reports_each_check(console: Console) -> None:
    client = console.client()
    body = client.get("/healthz").json()
    assert body["ok"] is True
    assert set(body["checks"]) == {"process", "database", "storage", "workers", "scheduler"}
    console.settings.disk_min_free_mb = 10**12  # more than any disk: storage must fail
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json()["checks"]["storage"]["ok"] is False


def test_metrics_are_prometheus_text(console: Console) -> None:
    text = console.client().get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["headscreen_instances_stored"] == 11
    assert samples['headscreen_jobs_finished_total{outcome="failed"}'] == 1
    assert samples['headscreen_deliveries{state="dead"}'] == 1
    assert samples['headscreen_pipeline_stage_duration_seconds_count{stage="inference"}'] == 4
    assert samples['headscreen_result_reference_quantile_bucket{le="0.5"}'] == 1
    assert samples['headscreen_result_reference_quantile_bucket{le="+Inf"}'] == 4
    assert console.seeded.positive not in text


def test_openapi_describes_the_api(console: Console) -> None:
    spec = console.client().get("/api/openapi.json").json()
    for path in ["/api/v1/studies", "/api/v1/studies/{study_uid}/review", "/api/v1/deliveries/resend",
                 "/api/v1/review-queue", "/healthz", "/metrics"]:
        assert path in spec["paths"], path
    params = {p["name"] for p in spec["paths"]["/api/v1/studies"]["get"]["parameters"]}
    assert {"state", "min_percentile", "max_age_gap", "qc_reason", "station", "sort", "page"} <= params


def test_web_server_thread_serves_and_stops(console: Console) -> None:
    server = start_web_server(console.settings, console.sessions, BUNDLES)
    try:
        assert console.settings.web.bind_address == "127.0.0.1"
        response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert response.status_code == 200 and response.json()["ok"]
    finally:
        server.shutdown()
    assert not server.thread.is_alive()


def test_cli_users_add_then_login(console: Console, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headscreen.daemon.cli import main

    config = tmp_path / "hs.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{console.settings.storage_dir}"\n'
                      f'database_url = "{console.settings.database_url}"\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert main(["-c", str(config), "users", "add", "carol", "--role", "viewer", "--password-stdin"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["-c", str(config), "users", "add", "dave", "--role", "admin", "--password-stdin"]) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert main(["-c", str(config), "users", "add", "carol", "--role", "admin", "--password-stdin"]) == 2
    client = console.client(("carol", "a-long-password"))
    assert client.get("/api/v1/me").json()["role"] == "viewer"


def test_drift_groups_current_results_by_station(console: Console) -> None:
    client = console.client(VIEWER)
    buckets = client.get("/api/v1/drift?period_days=1").json()
    # Summed over the daily buckets: the seed lies a few hours back, possibly across midnight
    # (then CT-SOUTH's two results fall on two days).
    by_station: dict[str, dict[str, float]] = {}
    for b in buckets:
        total = by_station.setdefault(b["station"], {"count": 0, "positives": 0, "percentile_sum": 0.0})
        total["count"] += b["count"]
        total["positives"] += b["positives"]
        total["percentile_sum"] += b["mean_percentile"] * b["count"]
    assert {s: b["count"] for s, b in by_station.items()} == {"CT-NORTH": 1, "CT-SOUTH": 2, "MR-EAST": 1}
    assert by_station["CT-NORTH"]["positives"] == 1 and by_station["CT-SOUTH"]["positives"] == 0
    assert by_station["CT-SOUTH"]["percentile_sum"] / 2 == pytest.approx((41.0 + 55.0) / 2)
    assert client.get("/api/v1/drift?modality=MR").json()[0]["station"] == "MR-EAST"
    assert client.get("/api/v1/drift?period_days=0").status_code == 422
    assert client.get("/api/v1/drift?modality=XX").status_code == 422


def test_overview_counts_and_latency(console_any_db: Console) -> None:
    body = console_any_db.client(VIEWER).get("/api/v1/overview").json()
    days = body["days"]
    assert len(days) == 14
    # Summed over the window: the seed lies a few hours back, possibly across midnight.
    totals = {k: sum(d[k] for d in days) for k in ("received", "completed", "results", "failed")}
    assert totals == {"received": 6, "completed": 5, "results": 4, "failed": 1}
    assert body["queue"]["jobs"]["failed"] == 1 and body["queue"]["oldest_queued_s"] is None
    assert body["deliveries"]["dead"] == 1
    latency = body["latency_s"]
    assert sum(n for _, _, n in latency) == 4
    assert all(mean == pytest.approx(420.0, abs=0.01) for _, mean, _ in latency)  # received -> result: 7 min
