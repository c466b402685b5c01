"""Reliability under crashes, bad input and floods (issue 12, "Measure and report").

A benchmark, not a test: it starts its own `headscreen serve` processes, abuses them and
prints what happened. It asserts nothing and never fails on a figure.

    .venv/bin/python bench/reliability.py                          # all sections, SQLite (~5-10 min, 2 cores)
    .venv/bin/python bench/reliability.py --kill-trials 3 --fuzz 8 --floods
    .venv/bin/python bench/reliability.py --db both                # SQLite, then a fresh PostgreSQL database
    .venv/bin/python bench/reliability.py --kill-trials 0 --fuzz 0 --floods     # floods only

Options: --kill-trials N (0 skips; trials cycle through ingest, worker, delivery),
--fuzz N (studies in the fuzzed corpus; 0 skips), --floods/--no-floods, --db sqlite|postgres|both,
--pg-admin URL (default postgresql://postgres@127.0.0.1:5432/postgres; a database
hs_reliability_* is created for each section and dropped after), --seed, --settle-timeout S,
--shipped-bundles (run the shipped bundles as they are; default is the shipped CT bundle
with its registration cut short, as tests/test_fuzz_input.py does, so a job takes ~2 s
rather than ~30 s; what is measured here is the machinery around the model).

Everything runs on 127.0.0.1 on free ports, in a temporary folder. Each `serve` is started
in its own session (process group) and stopped by that group's id (SIGTERM, then SIGKILL)
on exit, Ctrl-C or error. The PACS is played by this process: a pynetdicom Storage SCU
sends (per-instance C-STORE status is what "acknowledged" means) and a pynetdicom Storage
SCP receives the results (and counts every C-STORE it gets, per SOP Instance UID; it
takes --dest-delay, default 0.1 s, per C-STORE, as a PACS does). The sender's DIMSE timeout
is 15 s: pynetdicom notices a peer killed in the middle of a C-STORE only when it ends.
Serve runs with short timings so that a crash recovers in seconds, not minutes:
quiet_period_s 20, whole_quiet_s 2, lease_s 6, heartbeat_s 1, sweep_interval_s 0.25,
[delivery] timeout_s 5 (a delivery lease of 20 s), base/max delay 0.5/2 s, overlay_slices 8
(1 in the fuzzed run), one worker. Needs only the virtualenv; --db postgres needs a
PostgreSQL server that lets --pg-admin create and drop databases.

1. kill -9 trials. One serve (SQLite file or fresh PostgreSQL database) is killed and
   restarted again and again. Each trial sends `--studies-per-trial` new CT studies
   (96 x 96, 48 slices of 4 mm) in one association, waits for the trial's phase to show in
   the database (ingest: an instance row of the trial; worker: a job of the trial running;
   delivery: a delivery row of the trial), waits a random delay (seeded) and SIGKILLs the
   serve process group (receiver, scheduler, workers, delivery at once). Then it restarts
   serve, re-sends every instance the sender did not get acknowledged (as a PACS would),
   waits until the trial's studies settle (complete, no queued or running job, no pending
   or in-flight delivery) and counts:
     acked     instances acknowledged (Success or Warning), before the kill and on re-send
     resent    instances sent again because no acknowledgement came back
     lost      acknowledged instances without their row, or whose stored file (--storage
               postgresql: stored_blobs row) is missing, of the wrong size or does not parse
               (must be 0)
     dup rows  instance rows per SOP Instance UID > 1, plus results per (study, generation,
               bundle) > 1 (must be 0)
     redeliv   result objects the PACS received more than once (the same SOP Instance UID:
               at-least-once delivery after a kill mid-association; harmless to a PACS)
     reopened  superseded results: a study completed from the part received before the kill,
               then reopened by the re-sent rest (documented behaviour; an IOCM rejection
               note hides the old result)
     stuck     studies not settled within --settle-timeout
     no 1 rpt  studies without exactly one final report: the current result's SR delivered,
               and no other SR of the study at the PACS except superseded ones (must be 0)
     killed at  what the database held at the kill: instance rows of the trial, jobs and
               deliveries by state, and the random delay after the phase showed.
2. fuzzed input. A fresh serve gets a seeded corpus of studies (64 x 64, 8 mm) whose headers
   were damaged with tests/bad_input.py's catalogue (each mutation dealt to at least one
   study when N allows, as tests/test_fuzz_input.py does), sent as raw file bytes (a broken
   modality: nothing re-encodes them). Prints a row per study (its mutations, the C-STORE
   statuses its instances got, and how it ended), then the C-STORE statuses per code,
   studies received (at least one instance stored) and refused entirely, completed with a
   result, eligible / not eligible, received studies without a final SR delivered (must be
   0; a second figure counts the refused studies too, which the PACS at least saw fail),
   stuck, jobs retried or failed, and lines of serve's log holding one of the corpus'
   distinctive patient values (tests/bad_input.SECRETS).
3. floods (a fresh serve with the console, no workers):
   a. N idle TCP connections that never send, from N loopback addresses and from the PACS's
      own address; then a real C-ECHO and a C-STORE: served yes/no, seconds, and how many of
      the idle sockets the receiver closed;
   b. 300 associations from an unknown calling AE: rejected count, seconds, ingest_rejections
      rows added at once and after the refusal interval (set to 15 s here; default 60 s), and
      whether a C-ECHO from the PACS is still served;
   c. 200 wrong console passwords for one account from one address (POST /api/v1/login),
      then the right password of another account from the same address: answers per status
      (429 = throttled before hashing), seconds, whether the legitimate login succeeded,
      and login_locked audit rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # bad_input (the mutation catalogue), receiver_helpers, test_site_calibration

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, StoragePresentationContexts, evt  # noqa: E402
from pynetdicom import _config as pynetdicom_config  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from throwaway_db import throwaway_postgres  # noqa: E402

from headscreen.db.engine import make_engine  # noqa: E402
from headscreen.db.models import (  # noqa: E402
    AuditEvent,
    Delivery,
    IngestRejection,
    Instance,
    Job,
    Result,
    ResultObject,
    Series,
    StoredBlob,
    Study,
)
from headscreen.db.states import DeliveryState, JobState, ObjectKind, StudyState  # noqa: E402
from headscreen.export.delivery import requestor_handlers  # noqa: E402
from receiver_helpers import closed_by_peer, idle_sockets  # noqa: E402

CALLING_AE = "BENCHPACS"
DEST_AE = "BENCHDEST"
SCP_AE = "HEADSCREEN"
INTRUDER_AE = "INTRUDER"
ADMIN = ("benchadmin", "bench-admin-pw-1")
VIEWER = ("benchviewer", "bench-viewer-pw-2")
PHASES = ("ingest", "worker", "delivery")
# Random delay after the phase shows in the database (seconds, uniform from 0).
PHASE_WINDOW_S = {"ingest": 4.0, "worker": 2.5, "delivery": 1.2}
# The floods' serve records refusals once per kind, then a count per interval (default 60 s).
REFUSAL_INTERVAL_S = 15.0
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Send files as their raw bytes (pynetdicom does not decode and re-encode them): a damaged
# header reaches the receiver as the modality wrote it.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


# --- processes this bench starts ------------------------------------------------------------

class Children:
    """Every process started here, each in its own session: stopped by its group id only."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.processes.append(process)
        return process

    @staticmethod
    def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
        if process.pid in (os.getpid(), os.getpgrp()):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)  # start_new_session: the group id is the child's pid

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
        if process.poll() is None:
            self.signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(process, signal.SIGKILL)  # whatever of its group is left (workers)
        if process.poll() is None:
            process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            self.stop(process, 30.0)


CHILDREN = Children()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo(port: int, calling: str = CALLING_AE, timeout_s: float = 30.0) -> tuple[bool, float]:
    """A C-ECHO in its own association: (answered Success, seconds including association)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    ok = False
    if assoc.is_established:
        status = assoc.send_c_echo()
        ok = "Status" in status and status.Status == 0x0000
        assoc.release()
    return ok, time.perf_counter() - started


@dataclass
class Serve:
    """A private `headscreen serve`: own folder, ports, database and configuration."""

    work: Path
    database_url: str
    bundles: list[Path]
    destination_port: int | None = None
    workers: int = 1
    web: bool = False
    overlay_slices: int = 8
    refusal_interval_s: float = 60.0
    receiver_processes: int = 1
    storage_backend: str = "filesystem"
    process: subprocess.Popen[bytes] | None = None
    pools_started: int = field(default=0, init=False)  # "receiver_pool_start" log lines seen so far

    def __post_init__(self) -> None:
        self.port = free_port()
        self.web_port = free_port() if self.web else 0
        self.storage = self.work / "storage"
        self.log = self.work / "serve.log"
        self.config = self.work / "headscreen.toml"
        self.work.mkdir(parents=True, exist_ok=True)
        destinations = "" if self.destination_port is None else (
            f'{{ name = "pacs", ae_title = "{DEST_AE}", host = "127.0.0.1", port = {self.destination_port} }}')
        bundles = ", ".join(f'"{b}"' for b in self.bundles)
        self.config.write_text(f"""environment = "development"
bind_address = "127.0.0.1"
port = {self.port}
allowed_callers = [{{ ae_title = "{CALLING_AE}" }}]
storage_dir = "{self.storage}"
storage_backend = "{self.storage_backend}"
database_url = "{self.database_url}"
quiet_period_s = 20.0
whole_quiet_s = 2.0
workers = {self.workers}
disk_min_free_mb = 50
sweep_interval_s = 0.25
lease_s = 6.0
heartbeat_s = 1.0
overlay_slices = {self.overlay_slices}
bundles = [{bundles}]
destinations = [{destinations}]

[receiver]
refusal_log_interval_s = {self.refusal_interval_s}
processes = {self.receiver_processes}

[web]
enabled = {"true" if self.web else "false"}
port = {self.web_port or 8080}
bind_address = "127.0.0.1"

[delivery]
max_attempts = 8
base_delay_s = 0.5
max_delay_s = 2.0
timeout_s = 5.0

[selection.CT]
slice_thickness_mm = [0.4, 8.0]
""")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "headscreen", "-c", str(self.config), *args], cwd=REPO,
                              input=stdin, capture_output=True, text=True, timeout=300)

    def start(self, timeout_s: float = 180.0) -> float:
        """Start serve and wait for a C-ECHO; seconds it took."""
        started = time.monotonic()
        self.process = CHILDREN.spawn([sys.executable, "-m", "headscreen", "-c", str(self.config), "serve"], self.log)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
            # With several receiver processes, serve answers once its own listens; wait for all.
            if echo(self.port, timeout_s=5.0)[0] and (self.receiver_processes == 1 or self._log_count(
                    "action=receiver_pool_start") > self.pools_started):
                self.pools_started += self.receiver_processes > 1
                return time.monotonic() - started
            time.sleep(0.3)
        raise RuntimeError(f"serve did not answer C-ECHO in {timeout_s:.0f} s:\n{self.log_tail()}")

    def _log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    def kill9(self) -> None:
        """kill -9 the whole process group: receiver, scheduler, workers, delivery."""
        assert self.process is not None
        CHILDREN.signal_group(self.process, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the workers die with it; wait until none is left
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            CHILDREN.stop(self.process)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@contextlib.contextmanager
def database(kind: str, folder: Path, pg_admin: str) -> Iterator[str]:
    """A SQLite file in `folder`, or a fresh PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'storage' / 'headscreen.db'}"
        return
    with throwaway_postgres(pg_admin, "hs_reliability") as url:
        yield url


# --- the PACS: a sender and a destination ---------------------------------------------------

@dataclass
class Item:
    """One instance file as the PACS sends it, and what it has been told."""

    path: Path
    sop: str
    study: str
    statuses: list[int | None] = field(default_factory=list)

    @property
    def acked(self) -> bool:
        return any(s is not None and (s == 0x0000 or 0xB000 <= s <= 0xBFFF) for s in self.statuses)


def send_items(port: int, items: Sequence[Item]) -> None:
    """Send in one association, in order; stops at the first lost association (its
    remaining items get no status: a PACS would re-send them)."""
    ae = AE(ae_title=CALLING_AE)
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    # 15 s: pynetdicom notices a peer killed mid-C-STORE only when its DIMSE timeout ends.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE, evt_handlers=requestor_handlers())
    try:
        for item in items:
            if not assoc.is_established:
                item.statuses.append(None)
                continue
            try:
                response = assoc.send_c_store(item.path)
                item.statuses.append(int(response.Status) if "Status" in response else None)
            except Exception:  # noqa: BLE001 - the association died under it (the kill)
                item.statuses.append(None)
    finally:
        if assoc.is_established:
            assoc.release()


class Destination:
    """The PACS's Storage SCP for results: counts every C-STORE per SOP Instance UID.
    `delay_s` per C-STORE stands in for a PACS's own latency (and widens the delivery window)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.port = free_port()
        self.counts: Counter[str] = Counter()
        self.study_of: dict[str, str] = {}
        self.class_of: dict[str, str] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=DEST_AE)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        uid = str(event.request.AffectedSOPInstanceUID)
        study = str(event.dataset.get("StudyInstanceUID", ""))
        with self.lock:
            self.counts[uid] += 1
            self.study_of[uid] = study
            self.class_of[uid] = str(event.request.AffectedSOPClassUID)
        return 0x0000

    def received_for(self, studies: set[str]) -> dict[str, int]:
        with self.lock:
            return {uid: n for uid, n in self.counts.items() if self.study_of.get(uid) in studies}

    def sr_uids(self, study: str) -> set[str]:
        with self.lock:
            return {uid for uid, s in self.study_of.items()
                    if s == study and self.class_of[uid].startswith("1.2.840.10008.5.1.4.1.1.88.")
                    and self.class_of[uid] != "1.2.840.10008.5.1.4.1.1.88.59"}  # SR, not a KOS

    def stop(self) -> None:
        self.server.shutdown()


def write_study(head: object, folder: Path, *, rows: int, cols: int, thickness: float,
                extra: dict[str, str] | None = None, patient_id: str | None = None) -> list[Item]:
    from headscreen.imaging.phantoms import write_dicom_series

    study_uid, series_uid = generate_uid(), generate_uid()
    paths = write_dicom_series(head, folder, study_uid=study_uid, series_uid=series_uid, rows=rows, cols=cols,
                               slice_thickness=thickness, extra=extra, patient_id=patient_id)
    return [Item(p, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), study_uid) for p in paths]


# --- what the database says -----------------------------------------------------------------

@dataclass
class StudyView:
    uid: str
    exists: bool = False
    state: str | None = None
    jobs: list[tuple[str, int]] = field(default_factory=list)  # (state, attempts)
    current: list[int] = field(default_factory=list)  # non-superseded result ids
    superseded: int = 0
    sr_of_result: dict[int, str] = field(default_factory=dict)
    delivery_states: list[str] = field(default_factory=list)
    delivered_sr: set[str] = field(default_factory=set)
    superseded_sr: set[str] = field(default_factory=set)
    eligible: bool | None = None
    reason: str | None = None  # the current result's not-eligible reason (scrubbed of values)

    @property
    def settled(self) -> bool:
        return (self.exists and self.state == StudyState.COMPLETE
                and not any(JobState(s).is_active for s, _ in self.jobs)
                and not any(s in (DeliveryState.PENDING, DeliveryState.IN_FLIGHT) for s in self.delivery_states))


class Db:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def scalar(self, stmt: object) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar() or 0)  # type: ignore[arg-type]

    def instance_rows(self, studies: Sequence[str]) -> int:
        return self.scalar(select(func.count(Instance.id)).join(Series, Series.id == Instance.series_id)
                           .join(Study, Study.id == Series.study_id).where(Study.study_instance_uid.in_(studies)))

    def jobs_by_state(self, studies: Sequence[str]) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Job.state).join(Study, Study.id == Job.study_id)
                                .where(Study.study_instance_uid.in_(studies))).scalars().all()
        return Counter(str(JobState(r)) for r in rows)

    def deliveries_by_state(self, studies: Sequence[str]) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Delivery.state).join(ResultObject, ResultObject.id == Delivery.result_object_id)
                .join(Result, Result.id == ResultObject.result_id).join(Study, Study.id == Result.study_id)
                .where(Study.study_instance_uid.in_(studies))).scalars().all()
        return Counter(str(DeliveryState(r)) for r in rows)

    def views(self, studies: Sequence[str]) -> dict[str, StudyView]:
        views = {uid: StudyView(uid) for uid in studies}
        with self.engine.connect() as conn:
            found = conn.execute(select(Study.id, Study.study_instance_uid, Study.state)
                                 .where(Study.study_instance_uid.in_(studies))).all()
            by_id = {}
            for study_id, uid, state in found:
                view = views[uid]
                view.exists, view.state = True, str(StudyState(state))
                by_id[study_id] = view
            if not by_id:
                return views
            for study_id, state, attempts in conn.execute(
                    select(Job.study_id, Job.state, Job.attempts).where(Job.study_id.in_(by_id))):
                by_id[study_id].jobs.append((str(JobState(state)), attempts))
            results = conn.execute(select(Result.id, Result.study_id, Result.superseded, Result.eligible,
                                          Result.ineligible_reason).where(Result.study_id.in_(by_id))).all()
            view_of_result = {}
            for result_id, study_id, superseded, eligible, reason in results:
                view = by_id[study_id]
                view_of_result[result_id] = (view, superseded)
                if superseded:
                    view.superseded += 1
                else:
                    view.current.append(result_id)
                    view.eligible, view.reason = bool(eligible), reason
            if not view_of_result:
                return views
            objects = conn.execute(select(ResultObject.id, ResultObject.result_id, ResultObject.kind,
                                          ResultObject.sop_instance_uid)
                                   .where(ResultObject.result_id.in_(view_of_result))).all()
            object_info = {}
            for object_id, result_id, kind, sop in objects:
                view, superseded = view_of_result[result_id]
                object_info[object_id] = (view, superseded, str(ObjectKind(kind)), sop)
                if ObjectKind(kind) == ObjectKind.SR:
                    view.sr_of_result[result_id] = sop
                    if superseded:
                        view.superseded_sr.add(sop)
            if object_info:
                for object_id, state in conn.execute(select(Delivery.result_object_id, Delivery.state)
                                                     .where(Delivery.result_object_id.in_(object_info))):
                    view, superseded, kind, sop = object_info[object_id]
                    view.delivery_states.append(str(DeliveryState(state)))
                    if kind == ObjectKind.SR and DeliveryState(state) == DeliveryState.DELIVERED:
                        view.delivered_sr.add(sop)
        return views

    def duplicate_rows(self) -> tuple[int, int]:
        """(instance rows beyond one per SOP Instance UID, results beyond one per study version
        and bundle), over the whole database."""
        with self.engine.connect() as conn:
            sops = conn.execute(select(func.count(Instance.id) - 1).group_by(Instance.sop_instance_uid)
                                .having(func.count(Instance.id) > 1)).scalars().all()
            results = conn.execute(select(func.count(Result.id) - 1).join(Job, Job.id == Result.job_id)
                                   .group_by(Job.study_id, Job.generation, Job.bundle_name, Job.bundle_version)
                                   .having(func.count(Result.id) > 1)).scalars().all()
        return int(sum(sops)), int(sum(results))

    def lost(self, items: Sequence[Item], storage: Path, bytes_in_database: bool = False) -> list[str]:
        """Acknowledged instances without a row, or whose stored bytes (its file, or with
        `bytes_in_database` its stored_blobs row) are missing, short or unreadable."""
        acked = {i.sop: i for i in items if i.acked}
        rows = {}
        with self.engine.connect() as conn:
            uids = list(acked)
            for start in range(0, len(uids), 400):
                for sop, path, size in conn.execute(select(Instance.sop_instance_uid, Instance.path,
                                                           Instance.size_bytes)
                                                    .where(Instance.sop_instance_uid.in_(uids[start:start + 400]))):
                    rows[sop] = (path, size)
            blobs = ({key: bytes(data) for key, data in conn.execute(
                select(StoredBlob.key, StoredBlob.data).where(StoredBlob.key.in_([p for p, _ in rows.values()])))}
                if bytes_in_database and rows else {})
        lost = []
        for sop in acked:
            if sop not in rows:
                lost.append(f"{sop}: no row")
                continue
            key, size = rows[sop]
            try:
                data = blobs[key] if bytes_in_database else (storage / key).read_bytes()
                if len(data) != size:
                    lost.append(f"{sop}: {len(data)} bytes stored != row {size}")
                elif str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID) != sop:
                    lost.append(f"{sop}: the stored bytes hold another instance")
            except Exception as exc:  # noqa: BLE001
                lost.append(f"{sop}: {type(exc).__name__}")
        return lost

    def rejections(self, calling_ae: str | None = None) -> int:
        stmt = select(func.count(IngestRejection.id))
        if calling_ae is not None:
            stmt = stmt.where(IngestRejection.calling_ae == calling_ae)
        return self.scalar(stmt)

    def audit(self, action: str) -> int:
        return self.scalar(select(func.count(AuditEvent.id)).where(AuditEvent.action == action))


def settle(db: Db, studies: Sequence[str], timeout_s: float) -> tuple[float, dict[str, StudyView]]:
    """Wait until every study has settled (or the timeout); (seconds waited, last views)."""
    started = time.monotonic()
    while True:
        views = db.views(studies)
        if all(v.settled for v in views.values()) or time.monotonic() - started > timeout_s:
            return time.monotonic() - started, views
        time.sleep(0.5)


@contextlib.contextmanager
def started_serve(db_kind: str, root: Path, pg_admin: str, bundles: list[Path], destination_port: int | None = None,
                  *, prepare: Callable[[Serve], None] | None = None,
                  **options: object) -> Iterator[tuple[Serve, Db, float]]:
    """A private serve on a fresh database, `prepare`d and started: (serve, db, seconds to start).
    Stopped and closed on the way out, before its database is dropped."""
    with database(db_kind, root, pg_admin) as url:
        serve = Serve(root, url, bundles, destination_port, **options)  # type: ignore[arg-type]
        db: Db | None = None
        try:
            if prepare is not None:
                prepare(serve)
            up = serve.start()
            db = Db(url)
            yield serve, db, up
        finally:
            serve.stop()
            if db is not None:
                db.close()


def final_report_ok(view: StudyView, destination: Destination) -> bool:
    """Exactly one current result, its SR delivered and at the PACS, and no other SR of the
    study at the PACS except those of superseded results."""
    if len(view.current) != 1:
        return False
    sr = view.sr_of_result.get(view.current[0])
    if sr is None or sr not in view.delivered_sr or destination.counts.get(sr, 0) < 1:
        return False
    return destination.sr_uids(view.uid) - view.superseded_sr == {sr}


# --- output ---------------------------------------------------------------------------------

def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if k and c.replace(".", "").replace("-", "").isdigit() else c.ljust(w)
                               for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def counts_text(counter: Counter[str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


# --- 1. kill -9 trials ----------------------------------------------------------------------

@dataclass
class Trial:
    phase: str
    killed_at: str = ""
    studies: int = 0
    sent: int = 0
    acked: int = 0
    resent: int = 0
    lost: int = 0
    dup_rows: int = 0
    redelivered: int = 0
    reopened: int = 0
    stuck: int = 0
    bad_report: int = 0
    settle_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def wait_for_phase(db: Db, phase: str, studies: Sequence[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if phase == "ingest" and db.instance_rows(studies) > 0:
            return True
        if phase == "worker" and db.jobs_by_state(studies).get(JobState.RUNNING, 0) > 0:
            return True
        if phase == "delivery" and sum(db.deliveries_by_state(studies).values()) > 0:
            return True
        time.sleep(0.05)
    return False


def run_trial(index: int, phase: str, serve: Serve, db: Db, destination: Destination, heads: list[object],
              rng: random.Random, folder: Path, args: argparse.Namespace) -> Trial:
    trial = Trial(phase)
    items: list[Item] = []
    for k in range(args.studies_per_trial):
        items += write_study(heads[(index + k) % len(heads)], folder / f"t{index}-s{k}", rows=96, cols=96,
                             thickness=4.0)
    studies = list(dict.fromkeys(i.study for i in items))
    trial.studies, trial.sent = len(studies), len(items)

    if serve.receiver_processes > 1:
        # One association per study, at once, so that every receiver process stores.
        senders = [threading.Thread(target=send_items, args=(serve.port, [i for i in items if i.study == study]),
                                    daemon=True) for study in studies]
    else:
        senders = [threading.Thread(target=send_items, args=(serve.port, items), daemon=True)]
    for sender in senders:
        sender.start()
    reached = wait_for_phase(db, phase, studies, args.phase_timeout)
    delay = rng.uniform(0.0, PHASE_WINDOW_S[phase])
    time.sleep(delay)
    serve.kill9()
    rows = db.instance_rows(studies)
    t_kill = time.monotonic()
    for sender in senders:
        sender.join(120)
    acked_before_kill = sum(i.acked for i in items)
    t_joined = time.monotonic()
    trial.killed_at = (f"+{delay:.2f}s rows {rows}/{len(items)} (acked {acked_before_kill}) "
                       f"jobs {counts_text(db.jobs_by_state(studies))} "
                       f"deliv {counts_text(db.deliveries_by_state(studies))}")
    if not reached:
        trial.notes.append(f"phase {phase} not seen within {args.phase_timeout:.0f} s; killed anyway")
    restart_s = serve.start()
    for _ in range(5):  # the PACS re-sends what it was not told was stored
        missing = [i for i in items if not i.acked]
        if not missing:
            break
        trial.resent += len(missing)
        send_items(serve.port, missing)
    trial.acked = sum(i.acked for i in items)
    if trial.acked < len(items):
        trial.notes.append(f"{len(items) - trial.acked} never acknowledged after 5 re-sends")

    trial.settle_s, views = settle(db, studies, args.settle_timeout)
    trial.lost = len(lost := db.lost(items, serve.storage, serve.storage_backend == "postgresql"))
    trial.notes += lost[:3]
    dup_instances, dup_results = db.duplicate_rows()
    trial.dup_rows = dup_instances + dup_results
    trial.redelivered = sum(n - 1 for n in destination.received_for(set(studies)).values())
    trial.reopened = sum(v.superseded for v in views.values())
    trial.stuck = sum(not v.settled for v in views.values())
    trial.bad_report = sum(not final_report_ok(v, destination) for v in views.values())
    for view in views.values():
        if not final_report_ok(view, destination):
            trial.notes.append(f"study ..{view.uid[-8:]}: state {view.state} jobs {view.jobs} current {view.current} "
                               f"deliveries {Counter(view.delivery_states)}")
    trial.notes.insert(0, f"sender ended {t_joined - t_kill:.1f} s after "
                          f"the kill; restart {restart_s:.1f} s; settled in {trial.settle_s:.1f} s")
    return trial


def kill_trials(args: argparse.Namespace, db_kind: str, heads: list[object], bundles: list[Path],
                root: Path) -> None:
    rng = random.Random(args.seed)
    destination = Destination(delay_s=args.dest_delay)
    trials: list[Trial] = []
    try:
        with started_serve(db_kind, root, args.pg_admin, bundles, destination.port,
                           receiver_processes=args.receiver_processes,
                           storage_backend=args.storage) as (serve, db, first_start):
            print(f"\n[kill -9 trials, {db_kind}, storage {args.storage}] serve up in {first_start:.1f} s; "
                  f"{args.kill_trials} trials of "
                  f"{args.studies_per_trial} studies x 48 instances; PACS delay {args.dest_delay * 1000:.0f} ms "
                  f"per C-STORE; seed {args.seed}", flush=True)
            for index in range(args.kill_trials):
                phase = PHASES[index % len(PHASES)]
                started = time.monotonic()
                trial = run_trial(index, phase, serve, db, destination, heads, rng, root / "studies", args)
                trials.append(trial)
                print(f"  trial {index + 1} ({phase}) done in {time.monotonic() - started:.0f} s: "
                      + "; ".join(trial.notes), flush=True)
    finally:
        destination.stop()
    headers = ["trial", "phase", "killed at (delay, DB state)", "studies", "sent", "acked", "resent", "lost",
               "dup rows", "redeliv", "reopened", "stuck", "no 1 rpt", "settle s"]
    rows: list[list[object]] = [
        [k + 1, t.phase, t.killed_at, t.studies, t.sent, t.acked, t.resent, t.lost, t.dup_rows, t.redelivered,
         t.reopened, t.stuck, t.bad_report, f"{t.settle_s:.1f}"] for k, t in enumerate(trials)]
    for phase in PHASES:
        these = [t for t in trials if t.phase == phase]
        if these:
            rows.append([f"total {len(these)}", phase, ""] + [sum(getattr(t, a) for t in these) for a in (
                "studies", "sent", "acked", "resent", "lost", "dup_rows", "redelivered", "reopened", "stuck",
                "bad_report")] + [f"{max(t.settle_s for t in these):.1f}"])
    rows.append([f"total {len(trials)}", "all", ""] + [sum(getattr(t, a) for t in trials) for a in (
        "studies", "sent", "acked", "resent", "lost", "dup_rows", "redelivered", "reopened", "stuck", "bad_report")]
        + [f"{max((t.settle_s for t in trials), default=0):.1f}"])
    table(f"kill -9 trials ({db_kind}); must be 0: lost, dup rows, stuck, no 1 rpt", headers, rows)


# --- 2. fuzzed input ------------------------------------------------------------------------

def fuzz(args: argparse.Namespace, db_kind: str, heads: list[object], bundles: list[Path], root: Path) -> None:
    from bad_input import PATIENT, PATIENT_ID, damage, deal_mutations, leaks

    destination = Destination()
    plans = deal_mutations(args.fuzz, args.seed)
    try:
        with started_serve(db_kind, root, args.pg_admin, bundles, destination.port,
                           overlay_slices=1) as (serve, db, up):
            print(f"\n[fuzzed input, {db_kind}] serve up in {up:.1f} s; {args.fuzz} studies, "
                  f"{sum(map(len, plans))} mutations", flush=True)
            studies: dict[str, tuple[list[Item], list[str]]] = {}
            statuses: Counter[str] = Counter()
            started = time.monotonic()
            order: list[str] = []
            for k, plan in enumerate(plans):
                items = write_study(heads[k % len(heads)], root / "studies" / f"f{k}", rows=64, cols=64,
                                    thickness=8.0, extra=dict(PATIENT), patient_id=PATIENT_ID)
                rng = random.Random(args.seed * 1000 + k)
                for mutation in plan:
                    damage([i.path for i in items], mutation, rng)
                send_items(serve.port, items)
                for item in items:
                    status = item.statuses[-1]
                    statuses["no response" if status is None else f"0x{status:04X}"] += 1
                studies[items[0].study] = (items, [m.name for m in plan])
                order.append(items[0].study)
            sent_s = time.monotonic() - started
            received = [uid for uid, (items, _) in studies.items() if any(i.acked for i in items)]
            settle_s, views = settle(db, received, args.settle_timeout)
            serve.stop()
            leaked = [line for line in serve.log.read_text(errors="replace").splitlines() if leaks(line)]
    finally:
        destination.stop()

    bad = [uid for uid in received if not final_report_ok(views[uid], destination)]
    completed = [v for v in views.values() if v.current]
    jobs = [j for v in views.values() for j in v.jobs]
    rows = [
        ["studies sent", len(studies)],
        ["instances sent", sum(len(items) for items, _ in studies.values())],
        ["C-STORE statuses", counts_text(statuses)],
        ["studies received (>= 1 instance stored)", len(received)],
        ["studies refused entirely (every instance failed)", len(studies) - len(received)],
        ["studies with some instances refused", sum(any(not i.acked for i in items) and any(i.acked for i in items)
                                                    for items, _ in studies.values())],
        ["studies completed with a result", len(completed)],
        ["  eligible (screened)", sum(bool(v.eligible) for v in completed)],
        ["  not eligible (NOT SCREENED report)", sum(v.eligible is False for v in completed)],
        ["received studies without a final SR delivered (must be 0)", len(bad)],
        ["studies without a final SR, refused ones included", len(bad) + len(studies) - len(received)],
        ["studies stuck (not settled)", sum(not v.settled for v in views.values())],
        ["jobs retried (attempts > 1)", sum(a > 1 for _, a in jobs)],
        ["jobs failed", sum(s == JobState.FAILED for s, _ in jobs)],
        ["serve log lines with a corpus patient value", len(leaked)],
        ["seconds: send / settle", f"{sent_s:.1f} / {settle_s:.1f}"],
    ]
    per_study = []
    for k, uid in enumerate(order):
        items, names = studies[uid]
        codes = Counter("none" if i.statuses[-1] is None else f"{i.statuses[-1]:04X}" for i in items)
        view = views.get(uid)
        if view is None:
            outcome = "refused (nothing stored)"
        elif not view.current:
            outcome = f"no result ({view.state}, jobs {view.jobs})"
        elif view.eligible:
            outcome = "screened"
        else:
            outcome = f"not eligible: {str(view.reason)[:60]}"
        if view is not None and not final_report_ok(view, destination):
            outcome += "; NO FINAL SR DELIVERED"
        per_study.append([k + 1, " ".join(names), counts_text(codes), outcome])
    table(f"fuzzed input per study ({db_kind})", ["study", "mutations", "statuses", "outcome"], per_study)
    table(f"fuzzed input ({db_kind}, seed {args.seed})", ["figure", "value"], rows)
    for uid in bad:
        view = views[uid]
        print(f"  no final SR: {studies[uid][1]} state {view.state} jobs {view.jobs} current {view.current} "
              f"deliveries {Counter(view.delivery_states)}")
    for line in leaked[:3]:
        print(f"  patient value in log: {line[:200]}")


# --- 3. floods ------------------------------------------------------------------------------

def store_one(port: int, item: Item) -> tuple[str, float]:
    started = time.perf_counter()
    send_items(port, [item])
    status = item.statuses[-1]
    return ("no response" if status is None else f"0x{status:04X}"), time.perf_counter() - started


def _add_console_users(serve: Serve) -> None:
    """Migrate the database and add the admin and the viewer the login flood uses."""
    for command in (("db", "upgrade"), ("users", "add", ADMIN[0], "--role", "admin", "--password-stdin"),
                    ("users", "add", VIEWER[0], "--role", "viewer", "--password-stdin")):
        secret = {ADMIN[0]: ADMIN[1], VIEWER[0]: VIEWER[1]}.get(command[2]) if len(command) > 2 else None
        done = serve.cli(*command, stdin=None if secret is None else secret + "\n")
        if done.returncode != 0:
            raise RuntimeError(f"headscreen {' '.join(command)}: {done.stderr.strip()}")


def floods(args: argparse.Namespace, db_kind: str, heads: list[object], bundles: list[Path], root: Path) -> None:
    idle_rows: list[list[object]] = []
    with started_serve(db_kind, root, args.pg_admin, bundles, workers=0, web=True,
                       refusal_interval_s=REFUSAL_INTERVAL_S, prepare=_add_console_users) as (serve, db, up):
        print(f"\n[floods, {db_kind}] serve up in {up:.1f} s (console on {serve.web_port}, no workers)", flush=True)
        slices = write_study(heads[0], root / "studies" / "one", rows=64, cols=64, thickness=8.0)

        # a. idle connections
        ok, seconds = echo(serve.port)
        status, store_s = store_one(serve.port, slices[0])
        idle_rows.append(["none (baseline)", 0, "yes" if ok else "NO", f"{seconds:.3f}", status, f"{store_s:.3f}", "-"])
        for label, sources in ((f"{args.idle} addresses 127.0.2.x", [f"127.0.2.{i + 1}" for i in range(args.idle)]),
                               ("the PACS's address 127.0.0.1", ["127.0.0.1"] * args.idle)):
            idle = idle_sockets(serve.port, sources)
            try:
                time.sleep(0.5)
                ok, seconds = echo(serve.port)
                status, store_s = store_one(serve.port, slices[1 + len(idle_rows)])
                closed = sum(closed_by_peer(sock, 0.2) for sock in idle)
                idle_rows.append([label, len(idle), "yes" if ok else "NO", f"{seconds:.3f}", status,
                                  f"{store_s:.3f}", closed])
            finally:
                for sock in idle:
                    sock.close()
        table(f"a. idle TCP connections, then a real C-ECHO and C-STORE from {CALLING_AE} ({db_kind})",
              ["idle connections from", "open", "echo served", "echo s", "store status", "store s",
               "idle closed by receiver"], idle_rows)

        # b. refused associations
        time.sleep(REFUSAL_INTERVAL_S + 1)  # the idle evictions' counted rows are written first
        before_all, before = db.rejections(), db.rejections(INTRUDER_AE)
        ae = AE(ae_title=INTRUDER_AE)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 30
        started = time.perf_counter()
        rejected = other = 0
        for _ in range(300):
            assoc = ae.associate("127.0.0.1", serve.port, ae_title=SCP_AE)
            if assoc.is_rejected:
                rejected += 1
            else:
                other += 1
                if assoc.is_established:
                    assoc.release()
        flood_s = time.perf_counter() - started
        at_once = db.rejections(INTRUDER_AE) - before
        ok, seconds = echo(serve.port)
        time.sleep(REFUSAL_INTERVAL_S + 1.5)  # the counted rest is written by then
        after = db.rejections(INTRUDER_AE) - before
        table(f"b. 300 associations from unknown calling AE {INTRUDER_AE} ({db_kind})", ["figure", "value"], [
            ["rejected / other outcome", f"{rejected} / {other}"],
            ["seconds for the 300", f"{flood_s:.2f}"],
            ["ingest_rejections rows right after", at_once],
            [f"rows after the refusal interval ({REFUSAL_INTERVAL_S:.0f} s)", after],
            ["rows of all kinds added", db.rejections() - before_all],
            ["legitimate C-ECHO served / s", f"{'yes' if ok else 'NO'} / {seconds:.3f}"],
        ])

        # c. login flood
        base = f"http://127.0.0.1:{serve.web_port}"
        locked_before = db.audit("login_locked")
        answers: Counter[int] = Counter()
        with httpx.Client(base_url=base, timeout=30) as client:
            started = time.perf_counter()
            for _ in range(200):
                answers[client.post("/api/v1/login", json={"username": ADMIN[0],
                                                           "password": "wrong-password"}).status_code] += 1
            flood_s = time.perf_counter() - started
            t0 = time.perf_counter()
            legit = client.post("/api/v1/login", json={"username": VIEWER[0], "password": VIEWER[1]})
            legit_s = time.perf_counter() - t0
        with httpx.Client(base_url=base, timeout=30) as other_client:
            flooded = other_client.post("/api/v1/login", json={"username": ADMIN[0], "password": ADMIN[1]})
            health = other_client.get("/healthz/live").status_code
        table(f"c. 200 wrong passwords for {ADMIN[0]} from 127.0.0.1, then {VIEWER[0]}'s right one ({db_kind})",
              ["figure", "value"], [
                  ["answers to the 200", counts_text(Counter({str(k): v for k, v in answers.items()}))],
                  ["429 (throttled, no hashing)", answers.get(429, 0)],
                  ["seconds for the 200 / per request", f"{flood_s:.2f} / {1000 * flood_s / 200:.1f} ms"],
                  ["legitimate login (other account, same address)",
                   f"{legit.status_code} {'succeeded' if legit.status_code == 200 else 'FAILED'} in {legit_s:.3f} s"],
                  ["flooded account, right password (expected 429 while locked)", flooded.status_code],
                  ["login_locked audit rows added", db.audit("login_locked") - locked_before],
                  ["/healthz/live after the floods", health],
              ])
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        events = [line for line in metrics.splitlines()
                  if line.startswith(("headscreen_receiver_connection_events_total",
                                      "headscreen_receiver_store_refusals_total")) and not line.startswith("#")]
        if events:
            print("  receiver counters (/metrics): " + "; ".join(events))


# --- main -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _stopping_children() -> Iterator[None]:
    """Stop every process started here before the temporary folder goes."""
    try:
        yield
    finally:
        CHILDREN.stop_all()


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    return done.stdout.rstrip()


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-trials", type=int, default=6, help="kill -9 trials (0 skips; default 6)")
    parser.add_argument("--studies-per-trial", type=int, default=2)
    parser.add_argument("--receiver-processes", type=int, default=1,
                        help="[receiver] processes for the kill -9 trials; above 1, each study of a trial "
                             "is sent on its own association, all at once (default 1)")
    parser.add_argument("--fuzz", type=int, default=12, help="studies in the fuzzed corpus (0 skips; default 12)")
    parser.add_argument("--floods", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--idle", type=int, default=40, help="idle connections per flood (default 40)")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--storage", choices=("filesystem", "postgresql"), default="filesystem",
                        help="storage_backend of the kill -9 trials' serve (postgresql needs --db postgres)")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help=f"PostgreSQL admin URL (default {PG_ADMIN})")
    parser.add_argument("--seed", type=int, default=1212)
    parser.add_argument("--settle-timeout", type=float, default=240.0)
    parser.add_argument("--phase-timeout", type=float, default=120.0)
    parser.add_argument("--dest-delay", type=float, default=0.1, help="PACS seconds per C-STORE (default 0.1)")
    parser.add_argument("--shipped-bundles", action="store_true", help="the shipped bundles as they are (slower)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module=r"pydicom\..*")  # damaging the corpus warns about it
    for name in ("pynetdicom", "pydicom", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop what was started (also when SIGINT was ignored)
        signal.signal(signum, _interrupted)

    dirty = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    print(f"headscreen reliability bench: commit {_git('rev-parse', '--short', 'HEAD').strip()} "
          f"({'uncommitted changes in ' + ', '.join(dirty) if dirty else 'clean tree'}); "
          f"{os.cpu_count()} CPUs; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hs-reliability-") as tmp, _stopping_children():
            root = Path(tmp)
            from headscreen.imaging.phantoms import make_head

            heads = [make_head("CT", age=45.0 + 10 * k, seed=40 + k, spacing=(2.0, 2.0, 2.0)) for k in range(2)]
            if args.shipped_bundles:
                from headscreen.daemon.config import shipped_bundles

                bundles = [Path(b) for b in shipped_bundles()]
            else:
                from test_site_calibration import fast_bundle

                bundles = [fast_bundle(root / "bundle")]
            print(f"bundles: {', '.join(b.name for b in bundles)}"
                  f"{'' if args.shipped_bundles else ' (shipped CT bundle, registration cut short)'}", flush=True)
            kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
            sections: list[tuple[str, Callable[..., None], bool]] = [
                ("kill", kill_trials, args.kill_trials > 0), ("fuzz", fuzz, args.fuzz > 0),
                ("floods", floods, args.floods)]
            for kind in kinds:
                for name, section, wanted in sections:
                    if wanted:
                        section(args, kind, heads, bundles, root / f"{kind}-{name}")
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    print(f"\nwhole run: {time.monotonic() - started:.0f} s; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
