"""Login sessions in an HttpOnly SameSite=Strict cookie, roles, and CSRF checks.

Pages get a redirect to /login, the API a 401. Every state-changing request must
carry the session's CSRF token: a form field on pages, the X-CSRF-Token header on
the API.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from headscreen.daemon.web.context import context_of
from headscreen.db import api
from headscreen.db.users import ActiveSession

logger = logging.getLogger(__name__)

COOKIE = "hs_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


class LoginRequired(Exception):
    """Raised for pages: the app turns it into a redirect to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    csrf_token: str
    token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _lookup(request: Request) -> Principal | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 128:
        return None
    with context_of(request).db() as session:
        active: ActiveSession | None = api.resolve_session(session, token)
    if active is None:
        return None
    return Principal(active.user.username, active.user.role, active.csrf_token, token)


def api_user(request: Request) -> Principal:
    principal = _lookup(request)
    if principal is None:
        raise HTTPException(status_code=401, detail="login required", headers={"WWW-Authenticate": "Cookie"})
    return principal


def page_user(request: Request) -> Principal:
    principal = _lookup(request)
    if principal is None:
        raise LoginRequired(request.url.path)
    return principal


def _require_admin(principal: Principal) -> Principal:
    if not principal.is_admin:
        logger.warning("action refused for role", extra={"action": "forbidden", "user": principal.username})
        raise HTTPException(status_code=403, detail="admin role required")
    return principal


def csrf_ok(principal: Principal, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(principal.csrf_token, supplied or "")


def api_admin(request: Request, principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    """Admin on the API, with the CSRF header checked first (missing or wrong: 403)."""
    if not csrf_ok(principal, request.headers.get(CSRF_HEADER)):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return _require_admin(principal)


def api_admin_read(principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    """Admin on a read (GET) that shows more than a viewer may see; no CSRF needed."""
    return _require_admin(principal)


def api_csrf(request: Request, principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    """Any logged-in user, CSRF header checked (logout)."""
    if not csrf_ok(principal, request.headers.get(CSRF_HEADER)):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return principal


async def page_admin(request: Request, principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    """Admin on a page form, with the CSRF form field checked first."""
    form = await request.form()
    supplied = form.get(CSRF_FIELD)
    if not csrf_ok(principal, supplied if isinstance(supplied, str) else None):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return _require_admin(principal)


async def page_csrf(request: Request, principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    form = await request.form()
    supplied = form.get(CSRF_FIELD)
    if not csrf_ok(principal, supplied if isinstance(supplied, str) else None):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return principal


ApiUser = Annotated[Principal, Depends(api_user)]
ApiAdmin = Annotated[Principal, Depends(api_admin)]
ApiAdminRead = Annotated[Principal, Depends(api_admin_read)]
ApiCsrf = Annotated[Principal, Depends(api_csrf)]
PageUser = Annotated[Principal, Depends(page_user)]
PageAdmin = Annotated[Principal, Depends(page_admin)]
PageCsrf = Annotated[Principal, Depends(page_csrf)]
