"""`headscreen serve`: the receiver, the scheduler and a supervised pool of workers.

Roles are separate processes: this process receives (SCP) and schedules; each
worker is its own process, so a model never runs inside the SCP. SIGTERM drains:
stop accepting associations, let workers finish their current job (up to a
timeout), stop the sweeps.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.config import Settings, default_bundle_roots
from headscreen.daemon.gc_policy import freeze_startup_objects
from headscreen.daemon.receiver import ReceiverConfig, receiver_options
from headscreen.daemon.receiver_pool import ReceiverPool, start_receivers
from headscreen.daemon.scheduler import bundle_refs, start_scheduler
from headscreen.daemon.storage_probe import EXIT_STORAGE_MISMATCH, StorageMismatch, claim_storage, probe_applies
from headscreen.daemon.web import WebServer, start_web_server
from headscreen.daemon.web.health import ServeRuntime
from headscreen.daemon.worker import worker_process_main
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.types import BundleRef
from headscreen.errors import ConfigError, TransientError

log = logging.getLogger(__name__)

# How long `serve` waits for a PostgreSQL that is not up yet (a container started beside
# it, a host rebooting) before it gives up with exit status 1.
DATABASE_WAIT_S = 60.0


def receiver_config(settings: Settings) -> ReceiverConfig:
    return ReceiverConfig(
        ae_title=settings.ae_title,
        bind_address=settings.bind_address,
        port=settings.port,
        allowed_callers=[(c.ae_title, c.host) for c in settings.allowed_callers],
        allow_any_caller=settings.allow_any_caller,
        storage_dir=settings.storage_dir,
        disk_min_free_mb=settings.disk_min_free_mb,
        blobs_in_database=settings.storage_backend == "postgresql",
        **receiver_options(settings.receiver),
    )


@dataclass
class WorkerPool:
    """Keeps `count` worker processes alive; a worker that dies is replaced."""

    settings: Settings
    count: int
    processes: dict[int, multiprocessing.process.BaseProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        # Set by the sweeps when they queue a job: an idle worker claims it at once.
        self.wake = self._context.Event()

    def ensure(self) -> None:
        for index in range(self.count):
            process = self.processes.get(index)
            if process is not None and process.is_alive():
                continue
            if process is not None and process.exitcode == EXIT_STORAGE_MISMATCH:
                # Its log line says why; another start would refuse the same way.
                raise StorageMismatch("a worker refused storage_dir: it is not the storage the database records")
            if process is not None:
                log.warning("worker exited; starting a new one", extra={"worker": index, "exitcode": process.exitcode})
            process = self._context.Process(target=worker_process_main, args=(self.settings, index, self.wake),
                                            name=f"headscreen-worker-{index}", daemon=False)
            process.start()
            self.processes[index] = process

    def stop(self, timeout_s: float) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: finish the current job, then exit
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker did not drain in time; killing it", extra={"pid": process.pid})
                process.kill()
                process.join()


def _start_console(settings: Settings, sessions: sessionmaker[Session], bundles: list[BundleRef],
                   runtime: ServeRuntime | None = None) -> WebServer | None:
    """The admin console in a thread; a console that cannot start (port taken) is logged,
    and receiving and processing go on without it."""
    if not settings.web.enabled:
        return None
    try:
        return start_web_server(settings, sessions, bundles, runtime=runtime)
    except RuntimeError:
        log.exception("web console not started", extra={"action": "web_failed", "port": settings.web.port})
        return None


def usable_bundles(settings: Settings) -> list[BundleRef]:
    """Every configured bundle, verified; a bundle that fails its check stops serve
    (BundleError), and so does having none: a daemon without a model would take studies
    in and screen none of them."""
    bundles = bundle_refs(settings)
    if not bundles:
        looked = " or ".join(str(root) for root in default_bundle_roots())
        raise ConfigError(f"no usable model bundle: `bundles` is not set and no default bundle was found "
                          f"(looked in {looked}); set bundles = [\"/path/to/bundle\"] in the configuration")
    return bundles


def wait_for_database(url: str, timeout_s: float) -> None:
    """Return once PostgreSQL accepts a connection; retry every failure to connect (refused,
    a name not resolving yet, "starting up") for up to `timeout_s`, one log line per try,
    then raise TransientError with the last reason. SQLite needs no wait."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    from headscreen.db.engine import normalise_url
    from headscreen.privacy import redact_secrets

    parsed = normalise_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    engine = create_engine(parsed, poolclass=NullPool, connect_args={"connect_timeout": 5})
    started = time.monotonic()
    delay_s, attempt = 0.5, 0
    try:
        while True:
            attempt += 1
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            except OperationalError as exc:
                # The driver's first line says why (its later lines may quote more).
                first = str(exc.orig or type(exc).__name__).strip().splitlines()[:1]
                reason = redact_secrets(first[0]) if first else type(exc).__name__
                left_s = timeout_s - (time.monotonic() - started)
                if left_s <= 0:
                    raise TransientError(f"database not reachable after {timeout_s:.0f} s "
                                         f"({attempt} tries): {reason}") from None
                log.warning(f"database not reachable yet; retrying for up to {timeout_s:.0f} s",
                            extra={"action": "db_wait", "attempt": attempt, "reason": reason})
                time.sleep(min(delay_s, left_s))
                delay_s = min(delay_s * 2, 5.0)
                continue
            if attempt > 1:
                log.info("database reachable", extra={"action": "db_ready", "attempt": attempt,
                                                      "waited_s": round(time.monotonic() - started, 1)})
            return
    finally:
        engine.dispose()


def serve(settings: Settings, drain_timeout_s: float = 60.0) -> int:
    bundles = usable_bundles(settings)  # refuses before anything starts or is written
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    wait_for_database(settings.database_url, DATABASE_WAIT_S)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url, application_name="headscreen serve")
    sessions = session_factory(engine)
    if probe_applies(settings):
        claim_storage(settings.storage_dir, sessions)  # the identity workers check their storage_dir against
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    receiver = start_receivers(receiver_config(settings), sessions, processes=settings.receiver.process_count(),
                               database_url=settings.database_url, settings=settings)
    pool = WorkerPool(settings, settings.workers)
    scheduler = start_scheduler(settings, sessions, bundles, wake=pool.wake)
    pool.ensure()
    # The console's /healthz and /metrics read the receiver, sweeps and workers of this process.
    web = _start_console(settings, sessions, bundles, ServeRuntime(receiver, scheduler, pool))
    freeze_startup_objects()
    log.info(
        "headscreen serving",
        extra={"ae_title": settings.ae_title, "port": receiver.port, "workers": settings.workers,
               "bundles": [f"{b.name}-{b.version}" for b in bundles]},
    )
    try:
        while not stop.wait(1.0):
            pool.ensure()
            if isinstance(receiver, ReceiverPool):
                receiver.ensure()
    finally:
        log.info("draining")
        receiver.shutdown()
        if web is not None:
            web.shutdown()
        pool.stop(drain_timeout_s)
        scheduler.shutdown(wait=True)
        engine.dispose()
        log.info("stopped")
    return 0
