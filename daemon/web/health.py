"""/healthz: liveness (the process answers) and readiness (everything needed to accept
and process studies). Each check has its own verdict; a failed readiness answers 503
and names the checks that failed.

Readiness checks: the database answers; the storage folder is writable with free space
above disk_min_free_mb; workers take jobs (running jobs' leases are renewed, queued jobs
do not wait with nothing running); studies are completed (none stays "receiving" long
past its quiet period). Inside `headscreen serve` (a ServeRuntime is given) also: the
receiver answers a DICOM PDU, the scheduler's sweeps ran recently, every worker
process is alive. A console run alone (`headscreen web`) checks only what it can see
from the database.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from headscreen.daemon.web.context import WebContext, context_of
from headscreen.db import api
from headscreen.db.models import Study
from headscreen.db.states import StudyState
from headscreen.db.txn import end_read

router = APIRouter(tags=["operations"])

# A-RELEASE-RQ PDU (type 0x05, length 4). Sent before any A-ASSOCIATE-RQ it makes the
# SCP answer A-ABORT (PS3.8 state machine, Sta2 + Evt12 -> AA-1): proof that the receiver
# accepts connections and runs its DICOM upper layer, with no association, no caller
# check and no refusal recorded.
_RELEASE_RQ = bytes([0x05, 0x00, 0, 0, 0, 4, 0, 0, 0, 0])
_DICOM_PDU_TYPES = range(0x01, 0x08)
PROBE_TIMEOUT_S = 5.0
# Health endpoints need no login: probe results are reused this long, so a flood of
# requests cannot become a flood of connections to the receiver.
PROBE_REUSE_S = 5.0


@dataclass
class SweepClock:
    """When each scheduler job last finished, fed by an APScheduler listener."""

    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    last_ok: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time
    last_ok_at: dict[str, datetime] = field(default_factory=dict)  # job id -> wall clock (UTC)
    last_error: dict[str, float] = field(default_factory=dict)

    def on_event(self, event: Any) -> None:
        now, wall = time.monotonic(), datetime.now(UTC)
        with self._lock:
            if getattr(event, "exception", None) is None:
                self.last_ok[event.job_id] = now
                self.last_ok_at[event.job_id] = wall
            else:
                self.last_error[event.job_id] = now

    def snapshot(self) -> tuple[dict[str, float], dict[str, datetime], dict[str, float]]:
        with self._lock:
            return dict(self.last_ok), dict(self.last_ok_at), dict(self.last_error)


@dataclass
class ServeRuntime:
    """What `headscreen serve` runs beside its console: the receiver (daemon.receiver.Receiver),
    the scheduler (an APScheduler BackgroundScheduler) and the worker pool (daemon.serve.WorkerPool)."""

    receiver: Any
    scheduler: Any
    workers: Any
    sweeps: SweepClock = field(default_factory=SweepClock)
    probe: ReceiverProbe = field(init=False)

    def __post_init__(self) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED

        self.scheduler.add_listener(self.sweeps.on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.probe = ReceiverProbe()


class ReceiverProbe:
    """Speaks to the receiver's port as a peer would, at most once per PROBE_REUSE_S."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None

    def check(self, host: str, port: int, tls: ssl.SSLContext | None) -> dict[str, Any]:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < PROBE_REUSE_S:
                return self._last[1]
            started = time.monotonic()
            error = _probe_dicom(host, port, tls)
            result: dict[str, Any] = {"ok": error is None, "address": f"{host}:{port}", "tls": tls is not None,
                                      "answer_ms": round((time.monotonic() - started) * 1000, 1)}
            if error is not None:
                result["error"] = error
            self._last = (time.monotonic(), result)
            return result


def _probe_dicom(host: str, port: int, tls: ssl.SSLContext | None) -> str | None:
    """None when the port answered with a DICOM PDU, else what went wrong."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
            sock = tls.wrap_socket(raw, server_hostname=None) if tls is not None else raw
            sock.sendall(_RELEASE_RQ)
            reply = sock.recv(1)
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:  # refused, reset, unreachable, TLS failures (ssl.SSLError is one)
        return f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__
    if not reply:
        return "connection closed without a DICOM answer"
    if reply[0] not in _DICOM_PDU_TYPES:
        return f"answer is not a DICOM PDU (first byte 0x{reply[0]:02x})"
    return None


def _loopback_for(bind_address: str) -> str:
    """Where to reach a listener bound to `bind_address` from this host."""
    address = ipaddress.ip_address(bind_address)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return bind_address


# --- the checks -----------------------------------------------------------------------------


def liveness(ctx: WebContext) -> dict[str, Any]:
    return {"ok": True, "checks": {"process": _process(ctx)}}


def readiness(ctx: WebContext) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {"process": _process(ctx)}
    queue: api.QueueHealth | None = None
    overdue: tuple[int, float | None] | None = None
    started = time.monotonic()
    try:
        with ctx.db() as session:
            queue = api.queue_health(session)
            overdue = _overdue_studies(session, ctx)
        checks["database"] = {"ok": True, "backend": ctx.sessions.kw["bind"].dialect.name,
                              "answer_ms": round((time.monotonic() - started) * 1000, 1)}
    except Exception as exc:  # the report says what failed; the probe must not crash
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    checks["storage"] = _storage(ctx)
    checks["workers"] = _workers(ctx, queue)
    checks["scheduler"] = _scheduler(ctx, overdue)
    if ctx.runtime is not None:
        checks["receiver"] = _receiver(ctx)
    failed = sorted(name for name, check in checks.items() if not check["ok"])
    return {"ok": not failed, "failed": failed, "role": "serve" if ctx.runtime is not None else "console",
            "checks": checks}


# The old name: /healthz has always meant readiness.
health_report = readiness


def _process(ctx: WebContext) -> dict[str, Any]:
    return {"ok": True, "pid": os.getpid(), "uptime_s": round(time.monotonic() - ctx.started_monotonic, 1)}


def _storage(ctx: WebContext) -> dict[str, Any]:
    root = ctx.settings.storage_dir
    try:
        usage = shutil.disk_usage(root)
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    free_mb = usage.free // (1024 * 1024)
    writable = os.access(root, os.W_OK | os.X_OK)
    report: dict[str, Any] = {"ok": free_mb >= ctx.settings.disk_min_free_mb and writable, "free_mb": free_mb,
                              "min_free_mb": ctx.settings.disk_min_free_mb, "writable": writable,
                              "used_fraction": round(usage.used / usage.total, 3) if usage.total else None}
    if not writable:
        report["error"] = "storage_dir is not writable by this process"
    elif free_mb < ctx.settings.disk_min_free_mb:
        report["error"] = "free space below disk_min_free_mb (the receiver refuses instances)"
    return report


def _workers(ctx: WebContext, queue: api.QueueHealth | None) -> dict[str, Any]:
    if queue is None:
        return {"ok": False, "error": "database unavailable"}
    settings = ctx.settings
    running = queue.jobs.get("running", 0)
    # A lease not renewed for a whole lease_s past its expiry: its worker is gone and the
    # lease sweep has not returned the job to the queue either.
    now = datetime.now(UTC)
    stale = sum(1 for r in queue.running if r["lease_expires_at"] is not None
                and (now - _aware(r["lease_expires_at"])).total_seconds() > settings.lease_s)
    beats = [r["heartbeat_age_s"] for r in queue.running if r["heartbeat_age_s"] is not None]
    # Jobs waiting far longer than a lease while nothing runs means no worker takes them.
    stuck = (queue.oldest_queued_s is not None and queue.oldest_queued_s > 10 * settings.lease_s
             and running == 0)
    report: dict[str, Any] = {
        "running": running, "queued": queue.jobs.get("queued", 0), "expired_leases": queue.expired_leases,
        "stale_leases": stale, "oldest_queued_s": _round(queue.oldest_queued_s),
        "oldest_heartbeat_s": _round(max(beats)) if beats else None, "last_heartbeat_s": _round(queue.last_heartbeat_s),
    }
    errors = []
    if stale:
        errors.append(f"{stale} running job(s) without a heartbeat for over lease_s past their lease")
    if stuck:
        errors.append("jobs wait with none running: no worker takes them")
    pool = ctx.runtime.workers if ctx.runtime is not None else None
    if pool is not None:
        alive = sum(1 for p in list(pool.processes.values()) if p.is_alive())
        report |= {"processes_alive": alive, "processes_configured": pool.count}
        if alive < pool.count:
            errors.append(f"{pool.count - alive} of {pool.count} worker process(es) not running")
    if errors:
        report["error"] = "; ".join(errors)
    return {"ok": not errors, **report}


def _overdue_studies(session: Any, ctx: WebContext) -> tuple[int, float | None]:
    """Receiving studies quiet for much longer than the quiet period: the completeness
    sweep, wherever it runs, is not completing them."""
    cutoff = datetime.now(UTC) - timedelta(seconds=ctx.settings.quiet_period_s + _sweep_grace_s(ctx))
    count, oldest = session.execute(
        select(func.count(Study.id), func.min(Study.last_received_at))
        .where(Study.state == StudyState.RECEIVING, Study.last_received_at < cutoff)
    ).one()
    end_read(session)
    age = (datetime.now(UTC) - _aware(oldest)).total_seconds() if oldest is not None else None
    return int(count), age


def _sweep_grace_s(ctx: WebContext) -> float:
    return max(300.0, 20 * ctx.settings.sweep_interval_s)


def _scheduler(ctx: WebContext, overdue: tuple[int, float | None] | None) -> dict[str, Any]:
    report: dict[str, Any] = {}
    errors = []
    if overdue is None:
        errors.append("database unavailable")
    else:
        count, oldest_quiet_s = overdue
        report |= {"overdue_studies": count, "oldest_overdue_quiet_s": _round(oldest_quiet_s)}
        if count:
            errors.append(f"{count} stud{'y' if count == 1 else 'ies'} still receiving long after the quiet period")
    runtime = ctx.runtime
    if runtime is not None:
        running = bool(getattr(runtime.scheduler, "running", False))
        last_ok, last_ok_at, last_error = runtime.sweeps.snapshot()
        now = time.monotonic()
        since = now - last_ok.get("completeness", runtime.sweeps.started)
        limit = max(60.0, 10 * ctx.settings.sweep_interval_s)
        report |= {"running": running, "last_sweep_s": round(since, 1),
                   "last_sweep_at": last_ok_at["completeness"].isoformat() if "completeness" in last_ok_at else None,
                   "max_sweep_age_s": limit,
                   "failing": sorted(j for j, t in last_error.items() if t > last_ok.get(j, 0.0))}
        if not running:
            errors.append("the scheduler is not running")
        elif since > limit:
            errors.append(f"no completeness sweep finished in {since:.0f} s")
    if errors:
        report["error"] = "; ".join(errors)
    return {"ok": not errors, **report}


def _receiver(ctx: WebContext) -> dict[str, Any]:
    assert ctx.runtime is not None
    receiver = ctx.runtime.receiver
    settings = ctx.settings
    try:
        host = _loopback_for(settings.bind_address)
        port = int(receiver.port)
    except (OSError, ValueError, IndexError) as exc:
        return {"ok": False, "error": f"receiver not listening ({type(exc).__name__})"}
    tls: ssl.SSLContext | None = None
    if getattr(receiver, "tls_port", None) == port:  # TLS only: the probe speaks TLS too
        tls_settings = getattr(getattr(settings, "receiver", None), "tls", None)
        if getattr(tls_settings, "require_client_cert", False):
            # A handshake without a client certificate would be recorded as a refused peer.
            return {"ok": True, "address": f"{host}:{port}", "tls": True,
                    "probe": "not probed: TLS with client certificates only"}
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # only whether it answers is checked, not who it is
    return ctx.runtime.probe.check(host, port, tls)


def _aware(value: Any) -> datetime:
    # Aggregates bypass the UTC column type on SQLite and come back naive (or as text).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --- routes ---------------------------------------------------------------------------------


def _answer(report: dict[str, Any]) -> JSONResponse:
    return JSONResponse(report, status_code=200 if report["ok"] else 503, headers={"Cache-Control": "no-store"})


@router.get("/healthz/live", summary="Liveness: the process answers")
def healthz_live(request: Request) -> JSONResponse:
    return _answer(liveness(context_of(request)))


@router.get("/healthz/ready", summary="Readiness: studies can be accepted and processed (503 names what fails)")
def healthz_ready(request: Request) -> JSONResponse:
    return _answer(readiness(context_of(request)))


@router.get("/healthz", summary="Readiness (as /healthz/ready)")
def healthz(request: Request) -> JSONResponse:
    return _answer(readiness(context_of(request)))
