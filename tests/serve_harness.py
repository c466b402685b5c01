"""Starts a real `headscreen serve` process for end-to-end tests, and real peers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import func, select

from headscreen.daemon.orthanc import free_port
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Delivery, Instance, Job, Result, ResultObject, Study

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class RecordingSCP:
    """A real pynetdicom Storage SCP that counts what it receives (a destination)."""

    def __init__(self, folder: Path, ae_title: str = "RESULTS", port: int | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.received: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = None
        self.start()

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (self.folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        with self.lock:
            self.received[uid] += 1
        return 0x0000

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.glob("*.dcm"))]


@dataclass
class Daemon:
    """A `headscreen serve` subprocess with its own storage and database."""

    workdir: Path
    destinations: list[tuple[str, str, int]] = field(default_factory=list)
    allowed: tuple[str, ...] = ("STORESCU", "ORTHANC", "TESTSCU")
    workers: int = 1
    database_url: str | None = None
    extra: str = ""
    port: int = 0
    web_port: int = 0  # 0: console off, so parallel daemons never compete for a port
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.storage = self.workdir / "storage"
        self.database_url = self.database_url or f"sqlite:///{self.storage / 'headscreen.db'}"
        destinations = ", ".join(
            f'{{ name = "{n}", ae_title = "{a}", host = "127.0.0.1", port = {p} }}' for n, a, p in self.destinations
        )
        callers = ", ".join(f'{{ ae_title = "{a}" }}' for a in self.allowed)
        self.config = self.workdir / "headscreen.toml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"""environment = "development"
bind_address = "127.0.0.1"
port = {self.port}
allowed_callers = [{callers}]
storage_dir = "{self.storage}"
database_url = "{self.database_url}"
quiet_period_s = 10.0
whole_quiet_s = 1.0
workers = {self.workers}
disk_min_free_mb = 50
sweep_interval_s = 0.25
lease_s = 6.0
heartbeat_s = 1.0
destinations = [{destinations}]
{self.extra}
[web]
enabled = {"true" if self.web_port else "false"}
port = {self.web_port or 8080}
bind_address = "127.0.0.1"

[delivery]
max_attempts = 4
base_delay_s = 0.5
max_delay_s = 2.0
timeout_s = 10.0
"""
        )
        self.engine = None

    def use_shipped_timing(self, whole_quiet_s: float = 5.0) -> Daemon:
        """The shipped defaults (daemon.config.Settings) for the settings that make waits
        and polls, in place of the harness's short ones; for benchmarks (before start)."""
        text = self.config.read_text()
        for old, new in (("quiet_period_s = 10.0", "quiet_period_s = 60.0"),
                         ("whole_quiet_s = 1.0", f"whole_quiet_s = {whole_quiet_s}"),
                         ("sweep_interval_s = 0.25", "sweep_interval_s = 1.0"),
                         ("lease_s = 6.0", "lease_s = 120.0"), ("heartbeat_s = 1.0", "heartbeat_s = 10.0")):
            if old not in text:
                raise ValueError(f"Daemon.use_shipped_timing: {old!r} not in the harness's configuration")
            text = text.replace(old, new)
        self.config.write_text(text)
        return self

    def start(self, timeout_s: float = 90.0) -> Daemon:
        log = (self.workdir / "serve.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "headscreen", "-c", str(self.config), "serve"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
        wait_until(self.echo, timeout_s, 0.3, "C-ECHO from headscreen serve")
        return self

    def echo(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
        result = subprocess.run(["echoscu", "-aet", "TESTSCU", "-aec", "HEADSCREEN", "127.0.0.1", str(self.port)],
                                capture_output=True, timeout=30)
        return result.returncode == 0

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """kill -9 the serve process and its workers (the whole process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        path = self.workdir / "serve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def sessions(self):
        if self.engine is None:
            self.engine = make_engine(self.database_url)
        return session_factory(self.engine)

    def instance_count(self, study_uid: str | None = None) -> int:
        with self.sessions()() as session:
            query = select(func.count(Instance.id))
            if study_uid:
                query = query.join(Instance.series).join(Study).where(Study.study_instance_uid == study_uid)
            return session.scalar(query) or 0

    def jobs(self) -> list[Job]:
        with self.sessions()() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def results(self) -> list[Result]:
        with self.sessions()() as session:
            return list(session.scalars(select(Result).order_by(Result.id)))

    def deliveries(self) -> list[tuple[Delivery, ResultObject]]:
        with self.sessions()() as session:
            rows = session.execute(select(Delivery, ResultObject)
                                   .join(ResultObject, Delivery.result_object_id == ResultObject.id))
            return [tuple(r) for r in rows]

    def all_delivered(self, expected_results: int = 1) -> bool:
        results = [r for r in self.results() if not r.superseded]
        rows = self.deliveries()
        return len(results) >= expected_results and bool(rows) and all(d.state == "delivered" for d, _ in rows)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.engine is not None:
                self.engine.dispose()


def storescu(paths: list[Path], port: int, calling: str = "STORESCU", extra: tuple[str, ...] = (),
             check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = ["storescu", *extra, "-aet", calling, "-aec", "HEADSCREEN", "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=check, timeout=600)


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for a file (an empty list is a pass)."""
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
