"""Many machines, one queue (issue 15 item 3): the receiver and two workers, each in its own
network namespace on a virtual network, sharing a PostgreSQL of the test's own.

    host (the test): bridge 10.X.Y.1/24, PostgreSQL (its own initdb, on that address only),
                     the result destination (a Storage SCP), storescu
    ns r: `headscreen serve` with workers = 0 (the receiver)      10.X.Y.2
    ns a: `headscreen worker`                                      10.X.Y.3
    ns b: `headscreen worker`                                      10.X.Y.4

Two deployments, one per storage backend:
- filesystem (the shared-mount case): each worker's storage_dir is its own folder with the
  receiver's storage bind-mounted on it (as NFS would put it there). A worker whose
  storage_dir is a plain local folder refuses to take jobs (exit status 3); studies sent
  with storescu get exactly one current result each and every result object is delivered
  exactly once; kill -9 of the worker running a job (its job completes on the other worker
  once the lease has run out).
- postgresql (no shared filesystem at all): each worker has an empty folder of its own;
  exactly once again; a worker loses the database (and so the storage) for 30 s mid-job (its
  link down): the other worker does the job, and the one cut off stays up, comes back and
  screens the next study.
Each phase prints its time (pytest -s).

Needs root (namespaces, mounts) and iproute2; everything it creates carries a per-run
suffix and is removed by the fixture's finaliser, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from headscreen.daemon.config import shipped_bundles
from headscreen.daemon.orthanc import free_port
from headscreen.daemon.storage_probe import EXIT_STORAGE_MISMATCH, MARKER_NAME
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Delivery, Job, Result, ResultObject, Study
from headscreen.imaging.phantoms import make_head, write_dicom_series
from serve_harness import REPO, RecordingSCP, wait_until

pytestmark = pytest.mark.slow  # namespaces, a PostgreSQL of its own, three headscreen processes

LEASE_S = 6.0  # short, so a killed worker's job goes back to the queue within seconds
OUTAGE_S = 30.0
DICOM_PORT = 11112  # each namespace has its own ports


def pg_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql (tests/install-system-deps.sh)")
    return versions[-1].parent


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


class HostSCP(RecordingSCP):
    """The result destination, listening on the bridge address the namespaces reach."""

    def __init__(self, folder: Path, address: str) -> None:
        self.address = address
        super().__init__(folder)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server((self.address, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])


@dataclass
class Lab:
    root: Path
    cleanup: contextlib.ExitStack
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    database_url: str = ""

    def __post_init__(self) -> None:
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        while True:
            self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
            if f"inet {self.subnet}." not in used:
                break

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    # --- network -------------------------------------------------------------------------

    def bridge(self) -> None:
        name = f"hsb{self.suffix}"
        sh("ip", "link", "add", name, "type", "bridge")
        self.cleanup.callback(quietly, "ip", "link", "del", name)
        sh("ip", "addr", "add", f"{self.ip(1)}/24", "dev", name)
        sh("ip", "link", "set", name, "up")

    def namespace(self, role: str, host: int) -> str:
        """A network namespace joined to the bridge by a veth pair; returns its name."""
        ns, outer, inner = f"hs{self.suffix}{role}", f"hv{self.suffix}{role}", f"hn{self.suffix}{role}"
        sh("ip", "netns", "add", ns)
        self.cleanup.callback(quietly, "ip", "netns", "del", ns)  # its veth goes with it
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.cleanup.callback(quietly, "ip", "link", "del", outer)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", outer, "master", f"hsb{self.suffix}", "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", inner)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns

    def link(self, role: str, up: bool) -> None:
        """Cut (or restore) a namespace's only link: its host side down, its carrier gone."""
        sh("ip", "link", "set", f"hv{self.suffix}{role}", "up" if up else "down")

    # --- PostgreSQL ----------------------------------------------------------------------

    def postgres(self) -> None:
        """A PostgreSQL of the test's own, run as the postgres user, listening on the bridge
        address only (the host's cluster is never touched); stopped by PID."""
        account = pwd.getpwnam("postgres")
        folder = Path(tempfile.mkdtemp(prefix=f"hs-pg-{self.suffix}-"))
        self.cleanup.callback(shutil.rmtree, folder, True)
        os.chown(folder, account.pw_uid, account.pw_gid)
        data = folder / "data"
        subprocess.run([str(pg_bin() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       user="postgres", cwd=folder, check=True, capture_output=True, timeout=120)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.ip(0)}/24 trust\n")
        port = free_port()
        log = (folder / "postgres.log").open("ab")
        process = subprocess.Popen(
            [str(pg_bin() / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
             "-c", f"listen_addresses={self.ip(1)}", "-c", "max_connections=60"],
            user="postgres", cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.cleanup.callback(stop_postgres, process)
        admin = {"host": self.ip(1), "port": port, "user": "postgres", "connect_timeout": 3}

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"postgres exited with {process.returncode}")
            try:
                with psycopg.connect(dbname="postgres", autocommit=True, **admin) as connection:
                    connection.execute("CREATE DATABASE headscreen")
                return True
            except psycopg.OperationalError:
                return False

        wait_until(ready, 60, 0.3, "the test's PostgreSQL")
        self.database_url = f"postgresql+psycopg://postgres@{self.ip(1)}:{port}/headscreen"

    # --- headscreen processes ------------------------------------------------------------

    def config(self, name: str, storage: Path, destination: HostSCP, bind: str = "127.0.0.1",
               workers: int = 0, extra: str = "") -> Path:
        path = self.root / f"{name}.toml"
        pacs = f'name = "pacs", ae_title = "{destination.ae_title}", host = "{destination.address}"'
        # The CT bundle only: the studies are CT, and each worker warms up half as long.
        ct = [str(p) for p in shipped_bundles() if p.name.startswith("ct-")]
        path.write_text(f"""environment = "development"
bind_address = "{bind}"
port = {DICOM_PORT}
allowed_callers = [{{ ae_title = "STORESCU" }}, {{ ae_title = "TESTSCU" }}]
storage_dir = "{storage}"
database_url = "{self.database_url}"
quiet_period_s = 10.0
whole_quiet_s = 1.0
workers = {workers}
bundles = {json.dumps(ct)}
disk_min_free_mb = 50
sweep_interval_s = 0.25
lease_s = {LEASE_S}
heartbeat_s = 1.0
destinations = [{{ {pacs}, port = {destination.port} }}]
[web]
enabled = false

[delivery]
max_attempts = 4
base_delay_s = 0.5
max_delay_s = 2.0
timeout_s = 10.0
""")
        if extra:  # top-level keys go before the first table
            path.write_text(extra + path.read_text())
        return path

    def spawn(self, name: str, ns: str, *argv: str) -> subprocess.Popen:
        """A headscreen command inside namespace `ns`, in its own process group."""
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "headscreen", *argv],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        self.cleanup.callback(kill_group, process)
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def bind_mount(self, source: Path, target: Path) -> None:
        target.mkdir(parents=True)
        sh("mount", "--bind", str(source), str(target))
        self.cleanup.callback(quietly, "umount", "-l", str(target))


def quietly(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, timeout=60)


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def stop_postgres(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the multi-machine test needs root and iproute2 (tests/install-system-deps.sh)", pytrace=False)
    with contextlib.ExitStack() as cleanup:
        yield Lab(tmp_path, cleanup)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    """Five small head CTs (one phantom, a study and series UID each)."""
    root = tmp_path_factory.mktemp("studies")
    phantom = make_head("CT", age=47.0, seed=11)
    return [write_dicom_series(phantom, root / f"study-{n}", rows=256, cols=256, slices=90, slice_thickness=2.0,
                               series_description="HEAD 2.0 soft tissue") for n in range(5)]


class Phases:
    """Prints how long each phase took (seen with pytest -s; no assertion on time)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        print(f"multi-machine: {name} {now - self.last:.1f} s; load {os.getloadavg()[0]:.1f}")
        self.last = now


def study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


class Deployment:
    """One receiver and two worker hosts (namespaces r, a, b) on the lab's network and
    PostgreSQL, with `backend` as storage_backend; each worker host has its own storage folder."""

    def __init__(self, lab: Lab, backend: str) -> None:
        self.lab, self.backend = lab, backend
        self.phase = Phases()
        lab.bridge()
        lab.postgres()
        receiver_ns = lab.namespace("r", 2)
        self.worker_ns = {"a": lab.namespace("a", 3), "b": lab.namespace("b", 4)}
        self.destination = HostSCP(lab.root / "pacs", lab.ip(1))
        lab.cleanup.callback(self.destination.stop)
        self.storage = lab.root / "receiver-storage"
        self.receiver = lab.spawn("receiver", receiver_ns, "-c", str(self.config("receiver", self.storage, lab.ip(2))),
                                  "serve")
        wait_until(self.echo, 120, 0.5, "C-ECHO from the receiver's namespace")
        engine = make_engine(lab.database_url)
        lab.cleanup.callback(engine.dispose)
        self.sessions = session_factory(engine)
        self.folders = {role: lab.root / f"worker-{role}-storage" for role in ("a", "b")}
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}  # the log of each role's worker now running
        self.phase("network, PostgreSQL, receiver up")

    def config(self, name: str, storage: Path, bind: str = "127.0.0.1") -> Path:
        return self.lab.config(name, storage, self.destination, bind=bind,
                               extra=f'storage_backend = "{self.backend}"\n')

    def echo(self) -> bool:
        if self.receiver.poll() is not None:
            raise AssertionError(f"serve exited with {self.receiver.returncode}:\n{self.lab.log('receiver')[-3000:]}")
        return subprocess.run(["echoscu", "-aet", "TESTSCU", "-aec", "HEADSCREEN", self.lab.ip(2), str(DICOM_PORT)],
                              capture_output=True, timeout=30).returncode == 0

    def send(self, files: list[Path]) -> str:
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "HEADSCREEN", self.lab.ip(2), str(DICOM_PORT),
                        *map(str, files)], check=True, capture_output=True, timeout=300)
        return study_uid(files)

    def jobs(self) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def job_of(self, uid: str) -> Job | None:
        with self.sessions() as session:
            return session.scalar(select(Job).join(Study).where(Study.study_instance_uid == uid))

    def running(self, uid: str) -> Job:
        return wait_until(lambda: (j := self.job_of(uid)) is not None and j.state == "running" and j, 180, 0.05,
                          "the study's job running")

    def delivered(self, uids: list[str]) -> bool:
        with self.sessions() as session:
            current = session.scalars(select(Result).join(Study).where(
                Study.study_instance_uid.in_(uids), Result.superseded.is_(False))).all()
            states = session.scalars(select(Delivery.state).join(ResultObject).join(Result).join(Study).where(
                Study.study_instance_uid.in_(uids))).all()
        return len(current) == len(uids) and bool(states) and all(s == "delivered" for s in states)

    def start_workers(self) -> None:
        for index, role in enumerate(("a", "b"), start=1):
            self.logs[role] = f"worker-{role}-{index}"
            config = self.config(f"worker-{role}", self.folders[role])
            self.workers[role] = self.lab.spawn(self.logs[role], self.worker_ns[role], "-c", str(config), "worker",
                                                "--index", str(index))
        wait_until(lambda: self.warm("a") and self.warm("b"), 300, 0.5, "both workers warm")
        self.phase("two workers warm")

    def warm(self, role: str) -> bool:
        if self.workers[role].poll() is not None:
            raise AssertionError(f"worker {role} exited:\n{self.lab.log(self.logs[role])[-3000:]}")
        return "worker started" in self.lab.log(self.logs[role])

    def role_of(self, job: Job) -> str:
        assert job.lease_owner is not None
        pid = int(job.lease_owner.split(":")[1])
        return next(role for role, process in self.workers.items() if process.pid == pid)

    def check_exactly_once(self, sent: list[str]) -> None:
        """One current result per study, no result twice, each result object delivered once
        (one delivery row, received once by the destination)."""
        with self.sessions() as session:
            results = session.scalars(select(Result)).all()
            objects = session.scalars(select(ResultObject)).all()
            deliveries = session.scalars(select(Delivery)).all()
            studies_seen = session.scalars(select(Study.study_instance_uid)).all()
        assert sorted(studies_seen) == sorted(sent)
        assert len(results) == len(sent) and not any(r.superseded for r in results)
        assert len({r.study_id for r in results}) == len(sent)
        assert objects and sorted(d.result_object_id for d in deliveries) == sorted(o.id for o in objects)
        assert all(d.state == "delivered" for d in deliveries)
        assert set(self.destination.received) == {o.sop_instance_uid for o in objects}
        assert all(count == 1 for count in self.destination.received.values())
        assert self.receiver.poll() is None  # the receiver never noticed any of it


def test_shared_mount_probe_exactly_once_and_kill9(lab: Lab, studies: list[list[Path]]) -> None:
    """Filesystem backend: each worker host's storage folder is the receiver's storage, mounted."""
    hs = Deployment(lab, "filesystem")
    assert (hs.storage / MARKER_NAME).exists()

    # 1. Studies arrive while no worker is up; a worker whose storage_dir is a local folder
    #    (not the mount) refuses to take them and says why.
    sent = [hs.send(files) for files in studies[:3]]
    wait_until(lambda: len(hs.jobs()) == 3, 120, 0.5, "three jobs queued by the receiver")
    local = lab.root / "worker-b-local"
    local.mkdir()
    wrong = lab.spawn("worker-b-wrong", hs.worker_ns["b"], "-c", str(hs.config("worker-b-wrong", local)), "worker")
    assert wrong.wait(120) == EXIT_STORAGE_MISMATCH
    assert f"has no {MARKER_NAME}" in lab.log("worker-b-wrong") and "takes no jobs" in lab.log("worker-b-wrong")
    assert all(j.state == "queued" and j.attempts == 0 for j in hs.jobs())
    hs.phase("3 studies queued, the worker on a local folder refused")

    # 2. Two workers on the mount: every study screened once, every object delivered once.
    for folder in hs.folders.values():
        lab.bind_mount(hs.storage, folder)
    hs.start_workers()
    wait_until(lambda: hs.delivered(sent), 300, 0.5, "the first three studies delivered")
    hs.phase("3 studies screened and delivered")

    # 3. kill -9 of the worker host (its process group) that runs a job.
    sent.append(hs.send(studies[3]))
    victim = hs.role_of(hs.running(sent[-1]))
    survivor = "b" if victim == "a" else "a"
    kill_group(hs.workers[victim])
    wait_until(lambda: hs.delivered(sent), 240, 0.5, "the killed worker's study delivered by the other")
    redone = hs.job_of(sent[-1])
    assert redone is not None and redone.state == "done" and redone.attempts >= 2
    assert hs.role_of(redone) == survivor
    hs.phase("kill -9 mid-job: done by the other worker")
    hs.check_exactly_once(sent)


def test_no_shared_filesystem_exactly_once_and_database_outage(lab: Lab, studies: list[list[Path]]) -> None:
    """postgresql backend: no folder is shared; the bytes travel through PostgreSQL."""
    hs = Deployment(lab, "postgresql")
    assert not (hs.storage / MARKER_NAME).exists()  # no shared storage, nothing to probe

    # 1. Two workers, each with an empty storage folder of its own.
    for folder in hs.folders.values():
        folder.mkdir()
    hs.start_workers()
    sent = [hs.send(files) for files in studies[:3]]
    wait_until(lambda: hs.delivered(sent), 300, 0.5, "three studies delivered")
    assert not list(hs.storage.rglob("*.dcm"))  # the receiver kept no instance file
    hs.phase("3 studies screened and delivered")

    # 2. A worker loses the database (and so the storage) for 30 s mid-job (its link down): its
    #    job is done once by the other worker; it stays up, comes back, and takes jobs again.
    sent.append(hs.send(studies[3]))
    cut = hs.role_of(hs.running(sent[-1]))
    other = "b" if cut == "a" else "a"
    lab.link(cut, up=False)
    cut_at = time.monotonic()
    try:
        wait_until(lambda: hs.delivered(sent), 240, 0.5, "the cut-off worker's study delivered by the other")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
    finally:
        lab.link(cut, up=True)
    redone = hs.job_of(sent[-1])
    assert redone is not None and redone.attempts >= 2 and hs.role_of(redone) == other
    assert hs.workers[cut].poll() is None, f"the cut-off worker exited:\n{lab.log(hs.logs[cut])[-3000:]}"
    # It noticed (a heartbeat or a claim failed: which depends on where the cut found it).
    assert "heartbeat failed" in lab.log(hs.logs[cut]) or "database unreachable" in lab.log(hs.logs[cut])
    hs.phase("30 s without the database mid-job: the other worker did the job")
    # Only the worker that was cut off is left to take the next study.
    hs.workers[other].send_signal(signal.SIGTERM)
    assert hs.workers[other].wait(120) == 0
    sent.append(hs.send(studies[4]))
    wait_until(lambda: hs.delivered(sent), 240, 0.5, "the last study delivered by the worker that was cut off")
    last = hs.job_of(sent[-1])
    assert last is not None and hs.role_of(last) == cut
    hs.phase("the worker that was cut off screened the next study")
    hs.check_exactly_once(sent)
