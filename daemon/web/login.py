"""Logging in, for the page and the API alike: throttled, audited per lockout, and the
login form's CSRF token (there is no session yet to bind one to)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from fastapi import Request, Response

from headscreen.daemon.web.context import WebContext, context_of
from headscreen.daemon.web.throttle import Throttled
from headscreen.db import api
from headscreen.db.users import LoginSession

logger = logging.getLogger(__name__)

LOGIN_CSRF_COOKIE = "hs_login_csrf"
_NONCE_CHARS = 43  # secrets.token_urlsafe(32)


def cookie_secure(request: Request) -> bool:
    """Secure whenever the request came over HTTPS (uvicorn believes X-Forwarded-Proto only
    from the trusted proxies), or always when configured so."""
    return context_of(request).settings.web.secure_cookies or request.url.scheme == "https"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "-"


def login_csrf(request: Request) -> tuple[str, str]:
    """(nonce, token) for the login form: the token is an HMAC of a nonce kept in a
    SameSite=Strict cookie, so a form posted from another site (no cookie) or with a
    planted cookie (no key) fails. The nonce in the request's cookie is kept, so two
    open login tabs both work."""
    nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if len(nonce) != _NONCE_CHARS:
        nonce = secrets.token_urlsafe(32)
    return nonce, _sign(context_of(request), nonce)


def set_login_csrf_cookie(request: Request, response: Response, nonce: str) -> None:
    response.set_cookie(LOGIN_CSRF_COOKIE, nonce, max_age=12 * 3600, httponly=True, samesite="strict",
                        secure=cookie_secure(request), path="/login")


def login_csrf_ok(request: Request, supplied: str | None) -> bool:
    nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if len(nonce) != _NONCE_CHARS or not supplied:
        return False
    return secrets.compare_digest(_sign(context_of(request), nonce), supplied)


def _sign(ctx: WebContext, nonce: str) -> str:
    # The key is per process: a form rendered before a restart is refused once, then re-rendered.
    return hmac.new(ctx.login_csrf_key, nonce.encode(), hashlib.sha256).hexdigest()


def attempt_login(request: Request, username: str, password: str) -> LoginSession | None:
    """Check a password unless the account or the address is locked (raises Throttled,
    before any hashing); None when refused. Each lockout start is one audit row."""
    ctx = context_of(request)
    address = client_address(request)
    account = username[:64]
    throttle = ctx.login_throttle
    throttle.begin(account, address)
    try:
        with ctx.db() as session:
            opened = api.login(session, username, password, ctx.session_lifetime)
    except BaseException:
        throttle.abandoned(account, address)
        raise
    if opened is not None:
        throttle.succeeded(account, address)
        return opened
    lockouts = throttle.failed(account, address)
    if lockouts:
        with ctx.db() as session:
            for lock in lockouts:
                api.audit(session, account if lock.scope == "account" else "-", "login_locked",
                          detail={"scope": lock.scope, "address": address, "failures": lock.failures,
                                  "lock_s": lock.lock_s})
        for lock in lockouts:
            logger.warning("console log-ins locked", extra={"action": "login_locked", "scope": lock.scope,
                                                           "address": address, "lock_s": lock.lock_s})
    return None


__all__ = ["LOGIN_CSRF_COOKIE", "Throttled", "attempt_login", "client_address", "cookie_secure", "login_csrf",
           "login_csrf_ok", "set_login_csrf_cookie"]
