"""Worker processes: claim one job at a time under a lease, heartbeat, run, deliver.

A worker that dies (kill -9, power cut) stops heartbeating; the scheduler's
lease sweep returns its job to the queue and another worker takes it. Results
are written only through `db.api.finish_job`, which is fenced on the lease, so a
job completes exactly once even if a presumed-dead worker wakes up later.

Bundle roles (daemon.shadow) are read per job: a job claimed after a promotion runs
with the bundle active now. Shadow bundles score the study in the same worker, after
the active result is recorded and handed to delivery (see `_run_shadows`).

How a job that raised ends: a TransientError is retried; an input error (an input value
that does not decode: headscreen.errors.is_input_error) fails the same way on every try, so
it is never retried and the study gets its not-eligible report instead; anything else
not ours (a bug) is retried, then failed.

A result that supersedes another (the study changed) carries an IHE IOCM rejection note
listing the old result's instances, for the destinations with `iocm_rejection` on
(`_rejection_note`); delivery sends it after the new result (daemon.delivery).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import generate_uid
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from headscreen.bundle import load_bundle
from headscreen.daemon.blobstore import Scratch, open_store, result_prefix, sweep_scratch
from headscreen.daemon.config import Settings
from headscreen.daemon.delivery import deliver_due
from headscreen.daemon.gc_policy import freeze_startup_objects
from headscreen.daemon.pipeline import (
    SharedStages,
    StudyFiles,
    not_screened_after_error,
    rejection_note,
    run_job,
    score_shadow,
)
from headscreen.daemon.reference import ReferencePolicy, scoring_identity
from headscreen.daemon.shadow import RolePlan, resolve_roles
from headscreen.daemon.storage_probe import EXIT_STORAGE_MISMATCH, StorageMismatch, check_storage, probe_applies
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.types import BundleRef, JobOutcome, ShadowOutcome
from headscreen.errors import HeadscreenError, TransientError, is_input_error
from headscreen.imaging import concurrency as imaging_concurrency
from headscreen.inference import BundleRunner
from headscreen.privacy import failure_reason, frames_only, redact_secrets, withhold_values_in_logs

log = logging.getLogger(__name__)

# The longest wait between tries while the database is unreachable.
DB_RETRY_MAX_S = 10.0


def _db_reason(exc: Exception) -> str:
    """The driver's first line (refused, timed out); its later lines may quote statements."""
    first = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()[:1]
    return redact_secrets(first[0]) if first else type(exc).__name__


def job_retry_policy(settings: Settings) -> api.RetryPolicy:
    """How a failed job is retried: the settings' attempts, sooner and capped lower than a
    delivery (a job's transient failure is local: storage, the database)."""
    return api.RetryPolicy(max_attempts=settings.job_max_attempts, base_delay_s=5.0, max_delay_s=120.0)


def cores_per_worker(settings: Settings) -> int:
    """This machine's cores shared among the configured workers (at least 1)."""
    return max(1, (os.cpu_count() or 2) // max(1, settings.workers))


def load_runners(settings: Settings) -> dict[tuple[str, str], BundleRunner]:
    """Every configured bundle, verified and loaded once per process."""
    runners = {}
    for path in settings.bundles:
        runner = BundleRunner(load_bundle(path), intra_op_threads=cores_per_worker(settings))
        runners[(runner.bundle.manifest.name, runner.bundle.manifest.version)] = runner
    return runners


@dataclass
class ShadowWork:
    """Shadow bundles still to score a study whose active result is recorded."""

    ticket: api.JobTicket
    runners: list[BundleRunner]
    shared: SharedStages


class Worker:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], worker_id: str | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.runners = load_runners(settings)
        self.references = ReferencePolicy.from_settings(settings.calibration, self._site_reference)
        self.stopping = threading.Event()
        self._configured: list[BundleRef] | None = None
        self._shadow_work: ShadowWork | None = None
        self.store = open_store(settings, sessions)
        # This job's local copies (postgresql backend); removed when the job is done.
        self._scratch: Scratch | None = None
        self._study: tuple[int, StudyFiles] | None = None

    def _site_reference(self, name: str, version: str, scoring: str, grouping: str, station: str):
        """The active site reference for a bundle manifest and scanner group (read per job,
        so a new calibration applies to the next study without a restart)."""
        with self.sessions() as session:
            return api.active_site_reference(session, name, version, scoring, grouping, station)

    def warm_up(self) -> None:
        """Run one whole job per bundle on a small synthetic study before taking real ones.

        A head with a bleed, so that the overlays, the SEG and the SR are all built: the
        first real study then pays none of the first-use costs (template building, several
        seconds; the export libraries' lazy set-up, about half a second on a CT). Its files
        live in a temporary folder that is removed; nothing is recorded or sent, and its
        log lines are held back so that they cannot be read as a real job's.
        """
        import tempfile

        from headscreen.imaging.phantoms import Lesion, make_head, write_dicom_series

        for runner in self.runners.values():
            manifest = runner.bundle.manifest
            started = time.perf_counter()
            head = make_head(manifest.modality, age=50.0, seed=0, spacing=(2.0, 2.0, 2.0),
                             lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
            study_uid, series_uid = generate_uid(), generate_uid()
            ticket = api.JobTicket(job_id=0, study_id=0, study_instance_uid=study_uid, bundle_name=manifest.name,
                                   bundle_version=manifest.version, generation=0, attempt=1)
            outcome: JobOutcome | None = None
            with tempfile.TemporaryDirectory(prefix="headscreen-warm-up-") as folder:
                files = write_dicom_series(head, Path(folder) / "series", study_uid=study_uid, series_uid=series_uid,
                                           rows=128, cols=128, slices=80, slice_thickness=2.0)
                logging.disable(logging.INFO)
                try:
                    outcome = run_job(ticket, StudyFiles(study_uid, {series_uid: files}), runner,
                                      Path(folder) / "results", self.settings.overlay_slices,
                                      self.settings.selection_rules(manifest.modality),
                                      seg_enabled=self.settings.seg_enabled,
                                      seg_threshold=self.settings.seg_threshold)
                except Exception as exc:  # a real job will meet the same fault and record it
                    log.warning("warm-up job failed; the first study pays the start-up costs",
                                extra={"bundle": manifest.key, "error": failure_reason(exc)})
                finally:
                    logging.disable(logging.NOTSET)
            log.info("warmed up", extra={"bundle": manifest.key, "seconds": round(time.perf_counter() - started, 2),
                                         "objects": sorted({o.kind for o in outcome.objects}) if outcome else []})
        release_template_sources()

    def run_forever(self, poll_s: float = 0.5, wake: Waitable | None = None) -> None:
        """Claim jobs until stopped. `wake` (set by the scheduler of `serve` when it queues a
        job) ends the wait between polls at once; the poll stays for what no event announces
        (a retry whose backoff ended, a job queued by another machine or by the CLI)."""
        log.info("worker started",
                 extra={"worker_id": self.worker_id, "bundles": [f"{n}-{v}" for n, v in self.runners]})
        outage_s = 0.0
        while not self.stopping.is_set():
            if wake is not None:
                wake.clear()  # before the claim: a job queued after it sets it again
            try:
                worked = self.run_one()
            except (OperationalError, InterfaceError) as exc:
                # The database is gone for now (network, restart): wait and claim again. A job
                # in flight is not recorded; its lease runs out and the sweep queues it again.
                outage_s = min(max(1.0, outage_s * 2), DB_RETRY_MAX_S)
                log.error("database unreachable; trying again", extra={
                    "worker_id": self.worker_id, "action": "db_unreachable", "retry_in_s": outage_s,
                    "reason": _db_reason(exc)})
                self.stopping.wait(outage_s)
                continue
            if outage_s:
                log.info("database reachable again", extra={"worker_id": self.worker_id, "action": "db_ready"})
                outage_s = 0.0
            if not worked:
                (wake or self.stopping).wait(poll_s)
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    def run_one(self) -> bool:
        """Claim and process one job; False when the queue had nothing for us."""
        with self.sessions() as session:
            ticket = api.claim_job(session, self.worker_id, self.settings.lease_s, datetime.now(UTC))
        if ticket is None:
            return False
        self._scratch = Scratch(self.settings.storage_dir, f"job-{ticket.job_id}")
        try:
            result_id = self._process(ticket)
            shadows, self._shadow_work = self._shadow_work, None
            if result_id is not None:
                # The job is recorded and no longer leased, so a slow PACS cannot pass for a lost lease.
                deliver_due(self.sessions, self.settings, result_id=result_id)
                if shadows is not None:
                    self._run_shadows(shadows, result_id)
        finally:
            self._scratch.close()
            self._scratch, self._study = None, None
        return_freed_memory()
        return True

    def _plan(self) -> RolePlan | None:
        """The bundle roles now, read per job so a promotion applies to the next job
        claimed; None while no role is recorded (every job runs its own bundle, no shadows)."""
        with self.sessions() as session:
            rows = api.list_bundle_roles(session)
        if not rows:
            return None
        if self._configured is None:
            self._configured = [BundleRef(r.bundle.manifest.name, r.bundle.manifest.version,
                                          r.bundle.manifest.modality, scoring_identity(r.bundle))
                                for r in self.runners.values()]
        return resolve_roles(self._configured, rows)

    def _bound_to_active(self, ticket: api.JobTicket, plan: RolePlan, extra: dict) -> api.JobTicket | None:
        """The ticket to run: as claimed when its bundle is active; else moved to the bundle
        active now (a job queued before a promotion), or dropped when the study already has
        a job for that bundle. None when there is nothing to run."""
        if plan.is_active(ticket.bundle_name, ticket.bundle_version):
            return ticket
        modality = plan.modality_of(ticket.bundle_name, ticket.bundle_version)
        active = plan.active_for(modality) if modality else []
        if not active:
            if modality is None:
                return ticket  # a bundle nobody knows: it fails below as not loaded
            self._fail(ticket, f"no active {modality} bundle: see headscreen bundles --list", False,
                       job_retry_policy(self.settings))
            return None
        with self.sessions() as session:
            bound = api.rebind_job(session, ticket.job_id, self.worker_id, active[0], datetime.now(UTC))
        if bound is None:
            log.info("job dropped: the study is screened by the active bundle's own job",
                     extra={**extra, "bundle": f"{ticket.bundle_name}-{ticket.bundle_version}"})
        return bound

    def _shadow_runners(self, plan: RolePlan | None, runner: BundleRunner) -> list[BundleRunner]:
        if plan is None:
            return []
        refs = plan.shadows_for(runner.bundle.manifest.modality)
        return [self.runners[(ref.name, ref.version)] for ref in refs if (ref.name, ref.version) in self.runners]

    def _run_shadows(self, work: ShadowWork, result_id: int) -> None:
        """Each shadow bundle scores the study the active bundle just screened; the verdict
        is recorded only (nothing is written or sent), and a failure is recorded as the
        shadow's, never the active result's.

        Why here and not as jobs of their own: the active result is already recorded and on
        its way, so a shadow neither fails nor delays it; the study is read once and, with
        equal preprocessing parameters, preprocessed once (registration is most of the cost).
        The price: the next job waits for the shadows, and a worker killed meanwhile leaves
        that study without shadow verdicts (the comparison counts only studies both judged).
        """
        ticket = work.ticket
        extra = {"job_id": ticket.job_id, "study_uid": ticket.study_instance_uid, "worker_id": self.worker_id,
                 "result_id": result_id}
        study: StudyFiles | None = None
        for runner in work.runners:
            manifest = runner.bundle.manifest
            if self.stopping.is_set():
                log.info("shadow runs skipped: stopping", extra={**extra, "bundle": manifest.key})
                return
            try:
                study = study or self._study_files(ticket)
                shadow = score_shadow(study, runner, work.shared, self.settings.selection_rules(manifest.modality),
                                      references=self.references)
                log.info("shadow scored", extra={**extra, "bundle": manifest.key, "eligible": shadow.eligible,
                                                 "score": shadow.anomaly_score, "timings": shadow.timings})
            except Exception as exc:  # the shadow's own failure: recorded, the active result stands
                reason = failure_reason(exc)
                log.error("shadow bundle failed", extra={**extra, "bundle": manifest.key, "error": reason,
                                                         "error_trace": frames_only(sys.exc_info())})
                shadow = ShadowOutcome(bundle_name=manifest.name, bundle_version=manifest.version, error=reason)
            try:
                with self.sessions() as session:
                    api.record_shadow_result(session, result_id, shadow, datetime.now(UTC))
            except Exception as exc:
                log.error("shadow result not recorded", extra={**extra, "bundle": manifest.key,
                                                               "error": failure_reason(exc)})

    def _process(self, ticket: api.JobTicket) -> int | None:
        """Run the job while its lease is kept alive, then record how it ended; the new result's id, if any."""
        extra = {"job_id": ticket.job_id, "study_uid": ticket.study_instance_uid, "worker_id": self.worker_id}
        plan = self._plan()
        if plan is not None:
            bound = self._bound_to_active(ticket, plan, extra)
            if bound is None:
                return None
            ticket = bound
        runner = self.runners.get((ticket.bundle_name, ticket.bundle_version))
        policy = job_retry_policy(self.settings)
        if runner is None:
            self._fail(ticket, f"bundle {ticket.bundle_name}-{ticket.bundle_version} is not loaded on this worker",
                       False, policy)
            return None
        shadows = self._shadow_runners(plan, runner)
        shared = SharedStages() if shadows else None
        # Stopped (joined) before the job is recorded: once it is done or failed the lease is
        # no longer ours, and a renewal racing the record would be refused and read as a lost lease.
        with LeaseKeeper(self, ticket.job_id):
            outcome, failure = self._run(ticket, runner, extra, shared)
        if failure is not None:
            self._fail(ticket, *failure, policy)
            return None
        assert outcome is not None  # _run returns an outcome or a failure
        destinations = [d.name for d in self.settings.destinations]
        rejection = self._rejection_note(ticket, runner, outcome, extra)
        try:
            # The postgresql backend: the result objects' bytes go with the result's rows.
            outcome, notes, blobs = self.store.keep_results(outcome, self._result_prefix(ticket),
                                                            [rejection.object] if rejection is not None else [])
        except TransientError as exc:
            self._fail(ticket, failure_reason(exc), True, policy)
            return None
        if rejection is not None:
            rejection = dataclasses.replace(rejection, object=notes[0])
        with self.sessions() as session:
            result_id = api.finish_job(session, ticket.job_id, self.worker_id, outcome, destinations, datetime.now(UTC),
                                       rejection=rejection, blobs=blobs)
        if result_id is None:
            log.warning("lease lost before finishing; result discarded", extra=extra)
            return None
        log.info("job done", extra={**extra, "result_id": result_id})
        if shared is not None:
            self._shadow_work = ShadowWork(ticket, shadows, shared)
        return result_id

    def _rejection_note(self, ticket: api.JobTicket, runner: BundleRunner, outcome: JobOutcome,
                        extra: dict) -> api.RejectionNote | None:
        """The rejection note of the results this job's result will supersede, for the
        destinations that want one and were sent those results; None when there is none.
        Never fails the job: without a note the old result stays in view, as before IOCM."""
        wanted = [d.name for d in self.settings.destinations if d.iocm_rejection]
        if not wanted or not outcome.objects:
            return None  # a new result with nothing to show does not hide the old one
        with self.sessions() as session:
            current = api.current_results(session, ticket.study_id, ticket.bundle_name)
        objects = [o for result in current for o in result.objects]
        if not objects or not any(d in result.destinations for result in current for d in wanted):
            return None
        try:
            files = self.store.local_paths([o.path for o in objects], self._job_scratch())
            note = rejection_note(files, runner, self._output_dir(ticket))
        except Exception as exc:
            log.error("rejection note not built; the superseded result stays in view",
                      extra={**extra, "action": "rejection_note_failed", "error": failure_reason(exc),
                             "error_trace": frames_only(sys.exc_info())})
            return None
        rejected = tuple(result.result_id for result in current)
        log.info("rejection note built", extra={**extra, "sop_instance_uid": note.sop_instance_uid,
                                                "rejects_result_ids": list(rejected), "instances": len(objects)})
        return api.RejectionNote(note, rejected, tuple(wanted))

    def _result_prefix(self, ticket: api.JobTicket) -> str:
        return result_prefix(ticket.study_instance_uid, ticket.job_id, ticket.attempt)

    def _output_dir(self, ticket: api.JobTicket) -> Path:
        """Where the pipeline writes the result files: results_dir with the filesystem backend,
        the job's scratch folder with the postgresql one."""
        return self.store.result_folder(self._result_prefix(ticket), self._job_scratch())

    def _job_scratch(self) -> Scratch:
        if self._scratch is None:  # a caller outside run_one (tests): removed with the process
            self._scratch = Scratch(self.settings.storage_dir, "job")
        return self._scratch

    def _study_files(self, ticket: api.JobTicket) -> StudyFiles:
        """The study's instances as local files (copied into the job's scratch folder once per
        job with the postgresql backend; TransientError when bytes are missing)."""
        if self._study is not None and self._study[0] == ticket.job_id:
            return self._study[1]
        with self.sessions() as session:
            series = api.study_instances(session, ticket.study_id)
        scratch = self._job_scratch()
        study = StudyFiles(
            ticket.study_instance_uid,
            {uid: self.store.local_paths([path for path, _ in items], scratch) for uid, items in series.items()},
        )
        self._study = (ticket.job_id, study)
        return study

    def _run(
        self, ticket: api.JobTicket, runner: BundleRunner, extra: dict, shared: SharedStages | None = None,
    ) -> tuple[JobOutcome | None, tuple[str, bool] | None]:
        """(outcome, None), or (None, (reason, retryable)). Reasons and log lines never hold an
        exception's message from a library: pydicom and highdicom quote the values they reject."""
        output_dir = self._output_dir(ticket)
        study: StudyFiles | None = None
        try:
            study = self._study_files(ticket)
            rules = self.settings.selection_rules(runner.bundle.manifest.modality)
            # `shared` only when shadows will reuse the stages (the call is otherwise as before).
            more: dict[str, Any] = {} if shared is None else {"shared": shared}
            if self.settings.parametric_map_enabled:
                more["parametric_map_enabled"] = True
            outcome = run_job(ticket, study, runner, output_dir, self.settings.overlay_slices, rules,
                              seg_enabled=self.settings.seg_enabled, seg_threshold=self.settings.seg_threshold,
                              references=self.references, **more)
        except TransientError as exc:
            reason = failure_reason(exc)
            log.warning("job failed, will retry", extra={**extra, "error": reason})
            return None, (reason, True)
        except Exception as exc:  # an unexpected bug must not kill the worker
            if study is not None and is_input_error(exc):
                return self._not_screened(ticket, runner, study, output_dir, extra, exc, shared)
            reason = failure_reason(exc)
            log.error("job crashed", extra={**extra, "error": reason, "error_trace": frames_only(sys.exc_info())})
            return None, (reason, not isinstance(exc, HeadscreenError))
        return outcome, None

    def _not_screened(
        self, ticket: api.JobTicket, runner: BundleRunner, study: StudyFiles, output_dir: Path, extra: dict,
        exc: BaseException, shared: SharedStages | None,
    ) -> tuple[JobOutcome | None, tuple[str, bool] | None]:
        """An input error that reached the worker: never retried (it fails the same way every
        time); the study still gets its not-eligible report. Only when even that cannot be
        built is the job failed, for good. Storage trouble while reading is retried."""
        try:
            read = shared.last_read if shared is not None else None
            return not_screened_after_error(ticket, study, runner, output_dir, exc, read), None
        except TransientError as again:
            reason = failure_reason(again)
            log.warning("job failed, will retry", extra={**extra, "error": reason})
            return None, (reason, True)
        except Exception as again:
            log.error("not-eligible report failed", extra={**extra, "error": failure_reason(again),
                                                           "error_trace": frames_only(sys.exc_info())})
            return None, (failure_reason(exc), False)

    def _fail(self, ticket: api.JobTicket, reason: str, retryable: bool, policy: api.RetryPolicy) -> None:
        with self.sessions() as session:
            api.fail_job(session, ticket.job_id, self.worker_id, reason, retryable=retryable,
                         now=datetime.now(UTC), policy=policy)


def release_template_sources() -> None:
    """Drop the 1 mm template material (ICBM and Colin27 images, the tissue model: about
    0.5 GB) once the atlas-grid caches that preprocessing reads are built from it. A job
    reads only those; whatever needs the material again rebuilds it (seconds)."""
    from headscreen.imaging import templates

    templates.tissue_maps.cache_clear()
    templates.colin27_on_base.cache_clear()
    templates._icbm.cache_clear()
    gc.collect()
    return_freed_memory()


def use_small_pages() -> None:
    """Ask for 4 KiB pages for numpy's large arrays instead of transparent huge pages.
    A CT job's full-size arrays are fresh memory every job (return_freed_memory hands them
    back), and a huge page first touched on a host whose memory is fragmented (the page
    cache full of studies) stalls in compaction: `to_native` took 0.60-0.72 s a CT job
    with huge pages, 0.38-0.39 s without, and the worker's peak RSS is ~40 MB lower.
    NUMPY_MADVISE_HUGEPAGE, set by an admin, is left to decide."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    setter = numpy_hugepage_switch()
    if setter is not None:
        setter(False)


def numpy_hugepage_switch() -> Callable[[bool], bool] | None:
    """numpy's own switch behind NUMPY_MADVISE_HUGEPAGE (under numpy.core before 2.0); it
    returns its previous value. None where this numpy has none."""
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas. Each thread that allocates may get an arena of its own,
    which keeps what the thread freed: with steps side by side (imaging.concurrency) a CT
    job's peak RSS rose from 870-890 MB to 945-955 MB; with two arenas it is 890-960 MB.
    One arena keeps the old peak, but the threads then queue on its lock and the MR
    latency rose from 3.3 to 3.6-4.8 s. Returns False where this is not glibc. Call
    before threads start."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):
        return False


def return_freed_memory() -> None:
    """Hand what a job freed back to the system (glibc keeps freed heap pages otherwise,
    ~60 MB after a CT job), so the next job's peak starts from the idle size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LeaseKeeper:
    """Renews a job's lease every heartbeat_s from a thread, until stopped.

    A refused renewal means the job was taken back (the lease expired and the sweep
    requeued it, or the study was reopened); `db.api.heartbeat` warns "lease lost".
    """

    def __init__(self, worker: Worker, job_id: int) -> None:
        self.worker = worker
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing; returns once no renewal is in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        settings = self.worker.settings
        while not self._stop.wait(settings.heartbeat_s):
            try:
                with self.worker.sessions() as session:
                    alive = api.heartbeat(session, self.job_id, self.worker.worker_id, settings.lease_s,
                                          datetime.now(UTC))
            except Exception as exc:
                log.error("heartbeat failed", extra={"job_id": self.job_id, "error": failure_reason(exc)})
                continue
            if not alive:
                return  # nothing left to keep; finish_job's fence discards the result


class Waitable(Protocol):
    """An event shared with the scheduler (threading.Event, multiprocessing.Event)."""

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def worker_process_main(settings: Settings, worker_index: int, wake: Waitable | None = None) -> None:
    """Entry point of a worker process started by `headscreen serve`; `wake` is set when a job is queued."""
    from headscreen.daemon.logs import configure_logging

    configure_logging(settings)
    withhold_values_in_logs()
    use_small_pages()
    limit_malloc_arenas()
    # Registration's independent steps side by side only on cores no other worker needs.
    imaging_concurrency.set_threads(cores_per_worker(settings))
    engine = make_engine(settings.database_url, application_name=f"headscreen worker {worker_index}")
    if probe_applies(settings):
        # Before the bundles load: a worker on the wrong disk says so at once and takes no job.
        try:
            check_storage(settings.storage_dir, session_factory(engine))
        except StorageMismatch as exc:
            log.error(str(exc), extra={"action": "exit", "exit_code": EXIT_STORAGE_MISMATCH})
            engine.dispose()
            raise SystemExit(EXIT_STORAGE_MISMATCH) from None
    worker = Worker(settings, session_factory(engine),
                    worker_id=f"{socket.gethostname()}:{os.getpid()}:w{worker_index}")
    # SIGTERM drains: the current job finishes, then the loop ends.
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    try:
        sweep_scratch(settings.storage_dir)  # what a crashed job left in this machine's scratch
        worker.warm_up()
        # The bundles and atlas-grid caches too: a CT job sets off a full collection about
        # every other time, ~0.03 s instead of ~0.27 s.
        freeze_startup_objects()
        worker.run_forever(wake=wake)
    finally:
        engine.dispose()
