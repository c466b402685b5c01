"""Console log-in security: throttling per account and per address (429 before any
scrypt, one audit row per lockout), CSRF on the login form, Secure cookies over TLS,
and viewers reading error categories, never error text."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db_factories import BUNDLES
from headscreen.daemon.config import WebConfig
from headscreen.daemon.web import start_web_server
from headscreen.daemon.web.redact import error_category
from headscreen.daemon.web.throttle import LoginThrottle, Throttled
from headscreen.db import api
from headscreen.db.migrate import upgrade
from headscreen.db.models import Result, Study
from headscreen.db.types import ShadowOutcome
from web_helpers import ADMIN, VIEWER, Console, login_form_token, open_console

WRONG = "not-the-password"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_console(tmp_path: Path) -> Iterator[Callable[..., Console]]:
    """A seeded SQLite console; keyword arguments override [web] settings."""
    opened: list[Iterator[Console]] = []

    def make(**web: object) -> Console:
        url = f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
        upgrade(url)
        gen = open_console(tmp_path, url, **web)
        opened.append(gen)
        return next(gen)

    yield make
    for gen in opened:
        next(gen, None)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts password hashings (each ~50 ms of CPU in production)."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def _api_login(client: TestClient, user: tuple[str, str]) -> httpx.Response:
    return client.post("/api/v1/login", json={"username": user[0], "password": user[1]})


# --- throttling -------------------------------------------------------------------------

def test_wrong_passwords_lock_the_account_without_hashing_and_audit_once(
    make_console: Callable[..., Console], scrypt_calls: list[int]
) -> None:
    console = make_console()  # defaults: 5 failures per account, 30 per address
    app = console.app()
    client = console.client(app=app, address="10.0.0.1")
    before, hashed = console.audit_count(), len(scrypt_calls)
    statuses = []
    for _ in range(20):
        response = _api_login(client, (ADMIN[0], WRONG))
        statuses.append(response.status_code)
        assert "set-cookie" not in response.headers
    assert statuses == [401] * 5 + [429] * 15
    assert len(scrypt_calls) - hashed == 5  # the 15 refused attempts hashed nothing
    refused = _api_login(client, (ADMIN[0], WRONG))
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    # Bounded: the five checked failures and one row for the lockout, whatever the flood.
    assert console.audit_count() - before == 6
    locked = console.audit_rows("login_locked")
    assert [(e.actor, e.detail["scope"], e.detail["failures"]) for e in locked] == [(ADMIN[0], "account", 5)]
    # The right password of another account works, from the same address and from another.
    assert _api_login(client, VIEWER).status_code == 200
    assert _api_login(console.client(app=app, address="10.0.0.2"), VIEWER).status_code == 200
    # The locked account stays locked, even with its right password, from anywhere.
    calls = len(scrypt_calls)
    assert _api_login(console.client(app=app, address="10.0.0.3"), ADMIN).status_code == 429
    assert len(scrypt_calls) == calls


def test_lockouts_expire_and_grow_and_a_success_resets_the_account(
    make_console: Callable[..., Console]
) -> None:
    console = make_console(login_max_failures=3, login_lockout_s=30, login_lockout_max_s=100)
    app = console.app()
    clock = FakeClock()
    app.state.context.login_throttle.clock = clock
    client = console.client(app=app, address="10.0.0.1")

    # A success wipes the account's failures: 2 + success + 2 never reaches 3.
    assert [_api_login(client, (ADMIN[0], WRONG)).status_code for _ in range(2)] == [401, 401]
    assert _api_login(client, ADMIN).status_code == 200
    assert [_api_login(client, (ADMIN[0], WRONG)).status_code for _ in range(2)] == [401, 401]
    assert _api_login(client, (ADMIN[0], WRONG)).status_code == 401  # the third: locked from now
    first = _api_login(client, ADMIN)
    assert first.status_code == 429 and first.headers["retry-after"] == "30"

    clock.now += 31
    assert [_api_login(client, (ADMIN[0], WRONG)).status_code for _ in range(3)] == [401, 401, 401]
    second = _api_login(client, ADMIN)
    assert second.status_code == 429 and second.headers["retry-after"] == "60"  # doubled

    clock.now += 61
    for _ in range(3):
        _api_login(client, (ADMIN[0], WRONG))
    assert _api_login(client, ADMIN).headers["retry-after"] == "100"  # capped at login_lockout_max_s

    clock.now += 101
    assert _api_login(client, ADMIN).status_code == 200
    assert [e.detail["lock_s"] for e in console.audit_rows("login_locked")] == [30, 60, 100]


def test_an_address_guessing_many_accounts_is_locked_and_others_log_in(
    make_console: Callable[..., Console], scrypt_calls: list[int]
) -> None:
    console = make_console(login_max_failures_per_address=4)
    app = console.app()
    attacker = console.client(app=app, address="192.0.2.66")
    assert [_api_login(attacker, (f"guess{i}", WRONG)).status_code for i in range(4)] == [401] * 4
    calls = len(scrypt_calls)
    blocked = _api_login(attacker, ADMIN)  # even a right password, from the locked address
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert len(scrypt_calls) == calls
    assert _api_login(console.client(app=app, address="10.0.0.7"), ADMIN).status_code == 200
    locked = console.audit_rows("login_locked")
    assert [(e.detail["scope"], e.detail["address"]) for e in locked] == [("address", "192.0.2.66")]


def test_the_login_page_answers_429_with_retry_after(make_console: Callable[..., Console]) -> None:
    console = make_console(login_max_failures=2)
    client = console.client()
    for expected in (401, 401, 429):
        page = client.post("/login", data={"username": ADMIN[0], "password": WRONG,
                                           "csrf_token": login_form_token(client)})
        assert page.status_code == expected
    assert "Too many failed log-ins" in page.text and int(page.headers["retry-after"]) >= 1
    assert 'name="csrf_token"' in page.text  # the form can be used again once the wait is over


def test_checks_in_flight_count_against_the_limit() -> None:
    """Parallel guesses are admitted only up to the limit: the rest wait, unhashed."""
    throttle = LoginThrottle(WebConfig(login_max_failures=3), clock=FakeClock())
    for _ in range(3):
        throttle.begin("alice", "10.0.0.1")
    with pytest.raises(Throttled):
        throttle.begin("alice", "10.0.0.2")
    throttle.begin("bob", "10.0.0.1")  # another account is not held up by alice's
    throttle.succeeded("alice", "10.0.0.1")
    throttle.begin("alice", "10.0.0.1")  # alice's count was reset


def test_lockouts_start_short_again_after_a_quiet_spell() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(WebConfig(login_max_failures=1, login_lockout_s=10, login_lockout_max_s=40), clock)

    def lock_s() -> int:
        throttle.begin("alice", "10.0.0.1")
        (lock,) = throttle.failed("alice", "10.0.0.1")[:1]
        clock.now += lock.lock_s
        return lock.lock_s

    assert [lock_s() for _ in range(4)] == [10, 20, 40, 40]
    clock.now += 40  # a quiet spell as long as the longest lockout, counted from the last one's end
    assert lock_s() == 40
    clock.now += 41
    assert lock_s() == 10


def test_throttle_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("headscreen.daemon.web.throttle.MAX_KEYS", 50)
    throttle = LoginThrottle(WebConfig(), clock=FakeClock())
    for i in range(500):
        throttle.begin(f"user{i}", f"10.0.{i // 250}.{i % 250}")
        throttle.failed(f"user{i}", f"10.0.{i // 250}.{i % 250}")
    assert all(len(table) <= 50 for table in throttle._states.values())


# --- CSRF on the login form -------------------------------------------------------------

def test_login_form_without_a_valid_csrf_token_is_refused(make_console: Callable[..., Console]) -> None:
    console = make_console()
    app = console.app()
    client = console.client(app=app)
    form = {"username": ADMIN[0], "password": ADMIN[1]}
    before = console.audit_count()
    missing = client.post("/login", data=form)
    assert missing.status_code == 403 and "hs_session" not in missing.headers.get("set-cookie", "")
    token = login_form_token(client)
    altered = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert client.post("/login", data=form | {"csrf_token": altered}).status_code == 403
    # Another site's form: the SameSite=Strict cookie is not sent with it.
    cross_site = console.client(app=app)
    assert cross_site.post("/login", data=form | {"csrf_token": token}).status_code == 403
    # A planted cookie does not help without the server's key.
    planted = console.client(app=app)
    planted.cookies.set("hs_login_csrf", "A" * 43, path="/login")
    assert planted.post("/login", data=form | {"csrf_token": "A" * 43}).status_code == 403
    assert console.audit_count() == before  # refused before any password check
    ok = client.post("/login", data=form | {"csrf_token": token, "next": "/studies"})
    assert ok.status_code == 303 and ok.headers["location"] == "/studies"
    assert client.get("/api/v1/me").json()["username"] == ADMIN[0]


def test_login_api_takes_json_only(make_console: Callable[..., Console]) -> None:
    """A cross-site form can send text/plain but not JSON: such a body opens no session."""
    client = make_console().client()
    response = client.post("/api/v1/login", content=f'{{"username": "{ADMIN[0]}", "password": "{ADMIN[1]}"}}',
                           headers={"Content-Type": "text/plain"})
    assert response.status_code == 422 and "set-cookie" not in response.headers


# --- Secure cookies over TLS ------------------------------------------------------------

def _cookie_flags(response: httpx.Response, name: str) -> set[str]:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}
    raise AssertionError(f"no {name} cookie set")


def test_cookies_are_secure_over_https(make_console: Callable[..., Console]) -> None:
    console = make_console()
    tls = console.client(base_url="https://console.example")
    form = tls.get("/login")
    assert {"secure", "httponly", "samesite"} <= _cookie_flags(form, "hs_login_csrf")
    session = _api_login(tls, ADMIN)
    assert {"secure", "httponly", "samesite"} <= _cookie_flags(session, "hs_session")
    assert "samesite=strict" in session.headers["set-cookie"].lower()
    plain = _api_login(console.client(), ADMIN)
    assert "secure" not in _cookie_flags(plain, "hs_session")


def test_secure_cookies_setting_forces_secure_over_http(make_console: Callable[..., Console]) -> None:
    console = make_console(secure_cookies=True)
    assert "secure" in _cookie_flags(_api_login(console.client(), ADMIN), "hs_session")


def test_a_trusted_tls_proxy_makes_cookies_secure(make_console: Callable[..., Console]) -> None:
    """Through uvicorn: X-Forwarded-Proto from a trusted proxy (localhost by default) is
    believed, and X-Forwarded-For names the client that log-ins are throttled by."""
    console = make_console(login_max_failures_per_address=1)
    server = start_web_server(console.settings, console.sessions, BUNDLES)
    try:
        base = f"http://127.0.0.1:{server.port}/api/v1/login"
        body = {"username": ADMIN[0], "password": ADMIN[1]}
        proxied = httpx.post(base, json=body, headers={"X-Forwarded-Proto": "https"}, timeout=30)
        assert proxied.status_code == 200 and "secure" in _cookie_flags(proxied, "hs_session")
        direct = httpx.post(base, json=body, timeout=30)
        assert direct.status_code == 200 and "secure" not in _cookie_flags(direct, "hs_session")
        wrong = httpx.post(base, json=body | {"password": WRONG}, headers={"X-Forwarded-For": "203.0.113.9"},
                           timeout=30)
        assert wrong.status_code == 401
        assert [e.detail["address"] for e in console.audit_rows("login_locked")] == ["203.0.113.9"]
        assert httpx.post(base, json=body, timeout=30).status_code == 200  # the proxy's own address is not locked
    finally:
        server.shutdown()


def test_an_untrusted_peer_cannot_claim_tls(make_console: Callable[..., Console]) -> None:
    console = make_console(trusted_proxies=["192.0.2.1"])
    server = start_web_server(console.settings, console.sessions, BUNDLES)
    try:
        response = httpx.post(f"http://127.0.0.1:{server.port}/api/v1/login",
                              json={"username": ADMIN[0], "password": ADMIN[1]},
                              headers={"X-Forwarded-Proto": "https"}, timeout=30)
        assert response.status_code == 200 and "secure" not in _cookie_flags(response, "hs_session")
    finally:
        server.shutdown()


# --- viewers read error categories only -------------------------------------------------

SHADOW_ERROR = "RuntimeError: shadow model diverged on slice 17"


def _add_failed_shadow(console: Console) -> None:
    with console.sessions() as session:
        result_id = session.execute(
            select(Result.id).join(Study, Study.id == Result.study_id)
            .where(Study.study_instance_uid == console.seeded.positive)).scalar_one()
        api.record_shadow_result(session, result_id, ShadowOutcome(bundle_name="shadow-ct", bundle_version="2",
                                                                   error=SHADOW_ERROR))


def test_viewers_see_error_categories_and_admins_the_detail(make_console: Callable[..., Console]) -> None:
    console = make_console()
    _add_failed_shadow(console)
    s = console.seeded
    raw = ("no brain found", "association rejected", "diverged on slice")
    views = ["/api/v1/failures", "/failures", f"/api/v1/studies/{s.failed_job}", f"/studies/{s.failed_job}",
             f"/api/v1/studies/{s.dead_delivery}", f"/studies/{s.dead_delivery}",
             f"/api/v1/studies/{s.positive}", f"/studies/{s.positive}",
             f"/api/v1/studies/{s.failed_job}/audit", "/api/v1/audit"]
    viewer, admin = console.client(VIEWER), console.client(ADMIN)
    for path in views:
        response = viewer.get(path)
        assert response.status_code == 200, path
        assert [text for text in raw if text in response.text] == [], path
    failures = viewer.get("/api/v1/failures").json()
    assert failures["failed_jobs"][0]["last_error"] == "preprocess"
    assert failures["dead_deliveries"][0]["last_error"] == "error"
    shadow = viewer.get(f"/api/v1/studies/{s.positive}").json()["shadow_results"]
    assert [r["error"] for r in shadow] == ["RuntimeError"]
    job_failed = [e for e in viewer.get("/api/v1/audit").json() if e["action"] == "job_failed"]
    assert job_failed and job_failed[0]["detail"]["reason"] == "preprocess"
    assert "preprocess" in viewer.get("/failures").text

    admin_texts = "".join(admin.get(path).text for path in views)
    assert all(text in admin_texts for text in raw)
    assert admin.get("/api/v1/failures").json()["failed_jobs"][0]["last_error"] == "preprocess: no brain found"


def test_account_events_in_the_audit_trail_are_for_admins_only(make_console: Callable[..., Console]) -> None:
    """Who logged in, from where, and who failed to: a viewer reads the study trail, not that."""
    console = make_console()
    viewer, admin = console.client(VIEWER), console.client(ADMIN)  # each logs in: a "login" row
    with console.sessions() as session:
        api.audit(session, "mallory", "login_failed", detail={"address": "10.9.9.9"})
    account = ("login", "logout", "user_")
    seen_by_admin = {e["action"] for e in admin.get("/api/v1/audit").json()}
    assert {"login", "login_failed"} <= seen_by_admin
    seen_by_viewer = {e["action"] for e in viewer.get("/api/v1/audit").json()}
    assert seen_by_viewer and not [a for a in seen_by_viewer if a.startswith(account)], seen_by_viewer


@pytest.mark.parametrize(("text", "category"), [
    ("ValueError: Unable to convert '<withheld>' to 'DA' object", "ValueError"),
    ("TypeError (message withheld) at daemon/pipeline.py:12", "TypeError"),
    ("InputRejected: insufficient_coverage: 80 mm < 120 mm", "InputRejected"),
    ("insufficient_coverage: 80 mm < 120 mm", "insufficient_coverage"),
    ("preprocess: no brain found", "preprocess"),
    ("lease expired (worker host:1:w0, attempt 3)", "lease_expired"),
    ("C-STORE status 0xA700", "cstore_status"),
    ("Doe: something about the patient", "error"),  # a lone capitalised word may be a name
    ("association rejected", "error"),
    (None, None),
])
def test_error_category(text: str | None, category: str | None) -> None:
    assert error_category(text) == category



@pytest.mark.parametrize("bad", [{"trusted_proxies": ["*"]}, {"trusted_proxies": ["proxy.example"]},
                                 {"login_lockout_s": 600, "login_lockout_max_s": 60}, {"login_max_failures": 0}])
def test_web_settings_refuse_unsafe_throttle_and_proxy_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WebConfig(**bad)  # type: ignore[arg-type]
