"""Periodic sweeps run by APScheduler inside `headscreen serve`.

Each sweep is a plain function of (settings, sessions) so it can be called
directly from tests and from the CLI; the scheduler only times them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from headscreen.bundle import load_bundle
from headscreen.daemon.blobstore import open_store
from headscreen.daemon.config import Settings
from headscreen.daemon.delivery import deliver_due
from headscreen.daemon.reference import scoring_identity
from headscreen.daemon.shadow import current_plan
from headscreen.daemon.storage import DebrisCount, sweep_debris
from headscreen.db import api

log = logging.getLogger(__name__)


class JobsQueued(Protocol):
    """What the sweeps set when they queue a job (a multiprocessing.Event of `serve`)."""

    def set(self) -> None: ...


def bundle_refs(settings: Settings) -> list[api.BundleRef]:
    """Every configured bundle (verified), with its manifest's sha256 (bundle roles name it)."""
    refs = []
    for path in settings.bundles:
        bundle = load_bundle(path)
        manifest = bundle.manifest
        refs.append(api.BundleRef(manifest.name, manifest.version, manifest.modality, scoring_identity(bundle)))
    return refs


def active_bundles(sessions: sessionmaker[Session], bundles: list[api.BundleRef]) -> list[api.BundleRef]:
    """The configured bundles that screen new studies now: each modality's active one
    (daemon.shadow). Read per sweep, so a promotion needs no restart."""
    with sessions() as session:
        return current_plan(session, bundles).active


def sweep_completeness(settings: Settings, sessions: sessionmaker[Session], bundles: list[api.BundleRef],
                       wake: JobsQueued | None = None) -> list[int]:
    """Complete ready studies; each gets a job for its modality's active bundle (shadow
    bundles run inside that job, see daemon.worker). `wake` is set when any was completed,
    so an idle worker claims the job now rather than at its next poll."""
    active = active_bundles(sessions, bundles)
    with sessions() as session:
        completed = api.sweep_completeness(
            session, datetime.now(UTC), settings.quiet_period_s, settings.whole_quiet_s, active,
            max_attempts=settings.job_max_attempts, released_quiet_s=settings.released_quiet_s,
        )
    if completed:
        log.info("studies complete", extra={"action": "complete", "count": len(completed)})
        if wake is not None:
            wake.set()
    return completed


def sweep_leases(settings: Settings, sessions: sessionmaker[Session], wake: JobsQueued | None = None) -> int:
    with sessions() as session:
        returned = api.requeue_expired(session, datetime.now(UTC))
    if returned:
        log.warning("expired leases returned to the queue", extra={"action": "requeue_expired", "count": returned})
        if wake is not None:
            wake.set()
    return returned


def sweep_deliveries(settings: Settings, sessions: sessionmaker[Session]) -> None:
    deliver_due(sessions, settings)


def sweep_retention(settings: Settings, sessions: sessionmaker[Session]) -> int:
    """Delete received instances of finished studies older than retention_days."""
    if settings.retention_days <= 0:
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=settings.retention_days)
    with sessions() as session:
        candidates = api.retention_candidates(session, cutoff)
    store = open_store(settings, sessions)
    for study_id, study_uid in candidates:
        store.purge_study(study_id, study_uid)
    if candidates:
        log.info("retention purge", extra={"action": "purge", "count": len(candidates)})
    return len(candidates)


def sweep_storage(settings: Settings, sessions: sessionmaker[Session]) -> DebrisCount:
    """Remove crash debris from the storage tree (daemon.storage.sweep_debris)."""

    def recorded(paths: list[str]) -> set[str]:
        with sessions() as session:
            return api.recorded_instance_paths(session, paths)

    count = sweep_debris(settings.storage_dir, recorded)
    open_store(settings, sessions).sweep()  # scratch folders; orphaned bytes in the database
    return count


def start_scheduler(settings: Settings, sessions: sessionmaker[Session],
                    bundles: list[api.BundleRef], wake: JobsQueued | None = None) -> BackgroundScheduler:
    """The sweeps on their intervals; `wake` is set whenever a sweep queues a job (the
    workers of `serve` wait on it)."""
    scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    every = settings.sweep_interval_s
    scheduler.add_job(sweep_completeness, "interval", seconds=every, args=[settings, sessions, bundles, wake],
                      id="completeness")
    scheduler.add_job(sweep_leases, "interval", seconds=max(every, settings.heartbeat_s / 2),
                      args=[settings, sessions, wake], id="leases")
    scheduler.add_job(sweep_deliveries, "interval", seconds=max(every, 2.0), args=[settings, sessions], id="deliveries")
    scheduler.add_job(sweep_retention, "interval", hours=1, args=[settings, sessions], id="retention",
                      next_run_time=datetime.now(UTC) + timedelta(minutes=1))
    # At start (what a crash left) and hourly; safe while the receiver writes.
    scheduler.add_job(sweep_storage, "interval", hours=1, args=[settings, sessions], id="storage_debris",
                      next_run_time=datetime.now(UTC))
    scheduler.start()
    return scheduler
