"""/healthz: process, database, storage and workers, each with its own verdict."""

from __future__ import annotations

import shutil
import time
from typing import Any

from daemon.web.context import WebContext
from db import api


def health_report(ctx: WebContext) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {
        "process": {"ok": True, "uptime_s": round(time.monotonic() - ctx.started_monotonic, 1)},
    }
    try:
        with ctx.db() as session:
            queue = api.queue_health(session)
        checks["database"] = {"ok": True, "backend": ctx.sessions.kw["bind"].dialect.name}
    except Exception as exc:  # the report says what failed; the probe must not crash
        checks["database"] = {"ok": False, "error": type(exc).__name__}
        queue = None
    checks["storage"] = _storage(ctx)
    checks["workers"] = _workers(ctx, queue)
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


def _storage(ctx: WebContext) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(ctx.settings.storage_dir)
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    free_mb = usage.free // (1024 * 1024)
    return {"ok": free_mb >= ctx.settings.disk_min_free_mb, "free_mb": free_mb,
            "min_free_mb": ctx.settings.disk_min_free_mb, "used_fraction": round(usage.used / usage.total, 3)}


def _workers(ctx: WebContext, queue: api.QueueHealth | None) -> dict[str, Any]:
    if queue is None:
        return {"ok": False, "error": "database unavailable"}
    running = queue.jobs.get("running", 0)
    stale = queue.expired_leases
    # Jobs waiting far longer than a lease while nothing runs means no worker takes them.
    stuck = (queue.oldest_queued_s is not None and queue.oldest_queued_s > 10 * ctx.settings.lease_s
             and running == 0)
    return {"ok": stale == 0 and not stuck, "running": running, "queued": queue.jobs.get("queued", 0),
            "expired_leases": stale, "oldest_queued_s": queue.oldest_queued_s,
            "last_heartbeat_s": queue.last_heartbeat_s}
