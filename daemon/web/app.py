"""The FastAPI application: pages, REST API, /healthz (daemon.web.health) and /metrics
(daemon.web.metrics) over one WebContext."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from headscreen.daemon.config import Settings
from headscreen.daemon.web import health, metrics, pages, rest
from headscreen.daemon.web.auth import LoginRequired
from headscreen.daemon.web.context import WebContext
from headscreen.db.types import BundleRef

logger = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "Cache-Control": "no-store",
}


class BlankQueryParams:
    """Drops empty query parameters: a blank form field means "no filter"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            from urllib.parse import parse_qsl, urlencode

            pairs = [(k, v) for k, v in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True) if v]
            scope = dict(scope, query_string=urlencode(pairs).encode("latin-1"))
        await self.app(scope, receive, send)


def create_app(settings: Settings, sessions: sessionmaker[Session], bundles: list[BundleRef],
               runtime: health.ServeRuntime | None = None) -> FastAPI:
    """`runtime`: what `headscreen serve` runs beside the console (health and metrics read it)."""
    app = FastAPI(title="headscreen console", version="1", openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None)
    app.state.context = WebContext(settings=settings, sessions=sessions, bundles=bundles, runtime=runtime)
    app.state.metrics = metrics.build_registry(app.state.context)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(rest.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    app.add_middleware(BlankQueryParams)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            if key == "Cache-Control" and "cache-control" in response.headers:
                continue
            response.headers.setdefault(key, value)
        # Path only: query strings could carry free text; no patient data is ever in a URL.
        logger.debug("request", extra={"method": request.method, "path": request.url.path,
                                       "status": response.status_code,
                                       "ms": round((time.perf_counter() - started) * 1000, 1)})
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={exc.next_path}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def bad_input(request: Request, exc: RequestValidationError) -> Response:
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": problems}, status_code=422)
        return _error_page(request, 422, "; ".join(f"{'.'.join(map(str, p['loc'][1:]))}: {p['msg']}" for p in problems))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/healthz")) or request.url.path == "/metrics":
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _error_page(request, exc.status_code, str(exc.detail))

    return app


def _error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return pages.templates.TemplateResponse(request, "error.html", {"user": None, "status": status,
                                                                    "message": message}, status_code=status)
