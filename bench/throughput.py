"""Studies per hour and CPU-seconds per study, end to end, through a real `headscreen serve`.

N 300-slice 512 x 512 head CT studies (one phantom with a hemorrhage, a new UID set per
study) are sent back to back with dcmtk's storescu to `headscreen serve` (shipped bundles,
the result destination a dcmtk storescp), with 1 and 2 workers, on SQLite and, given
--postgres, on a throw-away PostgreSQL database. For each run it prints:
- studies/h from the first instance sent to the last result delivered, and sustained:
  between the first and the last but one study delivered (each study's last object),
  which leaves out the run's start (nothing to screen until the first study is complete)
  and its end (one worker finishing the last study while the other has nothing left);
- CPU-seconds per study of each process (serve: its receiver, scheduler; each further
  receiver process, `[receiver] processes`; each worker: job and delivery; the storescp
  destination), from /proc, over the run only;
- each worker's peak RSS during the run (VmHWM, reset once the worker is warm);
- on PostgreSQL, the database server's CPU (every PostgreSQL process on this machine, the
  backends that exited meanwhile included): headscreen's database, counted in its CPU per
  study as SQLite's work is (inside serve and the workers);
- the sender's CPU (the storescu runs) and the destination's, which are not headscreen's but
  share the cores here, and with them the most studies/h these cores could give at full use;
- the anchor of the same run: one study sent to a bare dcmtk storescp (wall and CPU), the
  cost of receiving alone, and the load average (the machine may be shared).

    .venv/bin/python bench/throughput.py [--studies 8] [--workers 1 2] [--postgres ADMIN_URL] [--test-timing]

serve runs with the shipped defaults for the settings that make waits and polls (the
completeness sweep every 1 s, a study complete 1 s after its sender's release); with
--test-timing, the test harness's shorter ones (sweeps every 0.25 s), which stop 43 and
earlier measured with and which cost serve more CPU per study.

Targets (issue 14): <= 3 CPU-s per study end to end, >= 2,000 studies/h on 2 cores with
workers=2, worker peak RSS <= 1 GB. A benchmark, not a test: it prints and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pydicom  # noqa: E402
from proc_cpu import CLOCK_TICKS, cpu_seconds, stat_fields  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from throwaway_db import throwaway_postgres  # noqa: E402

from headscreen.daemon.orthanc import free_port  # noqa: E402
from headscreen.daemon.receiver_pool import PROCESS_NAME_PREFIX  # noqa: E402
from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series  # noqa: E402
from serve_harness import Daemon, storescu, wait_until  # noqa: E402


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def postgres_server_cpu_seconds() -> float:
    """CPU-seconds of every PostgreSQL server process on this machine so far, and of the
    backends that have exited (their postmaster's reaped children). The whole server: a
    shared machine's other databases would count too."""
    total = 0.0
    for entry in Path("/proc").glob("[0-9]*"):
        stat = stat_fields(entry.name)
        if stat is None or stat[0] != "postgres":
            continue
        fields = stat[1]
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        parent = stat_fields(fields[1])
        if parent is None or parent[0] != "postgres":  # the postmaster: add the backends it has reaped
            total += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return total


def send_timed(daemon: Daemon, studies: list[list[Path]], pids: dict[str, int],
               timeout_s: float, database_server: bool = False) -> tuple[float, dict[str, float]]:
    """Send every study with storescu and wait until all results are delivered: the wall
    seconds from the first send, and the CPU seconds each of `pids` (and with
    `database_server`, the PostgreSQL server) spent meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    server_before = postgres_server_cpu_seconds() if database_server else 0.0
    senders_before = _children_cpu_seconds()
    started = time.monotonic()
    for files in studies:
        storescu(files, daemon.port)
    senders = _children_cpu_seconds() - senders_before  # the storescu runs, each waited for
    wait_until(lambda: daemon.all_delivered(len(studies)), timeout_s, 0.2, "all results delivered")
    seconds = time.monotonic() - started
    cpu = {**{name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}, SENDER: senders}
    if database_server:
        cpu[DATABASE] = postgres_server_cpu_seconds() - server_before
    return seconds, cpu


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Not headscreen's: the PACS at either end, which shares this machine's cores in the bench.
SENDER, DESTINATION = "sender", "destination"
# headscreen's database server (PostgreSQL runs only), counted as headscreen's.
DATABASE = "database"


def make_studies(root: Path, count: int) -> list[list[Path]]:
    """`count` copies of one 300-slice CT, each with its own study, series and SOP UIDs."""
    phantom = make_head("CT", age=62.0, seed=21,
                        pose=Pose(rotation_deg=(2.0, -3.0, 5.0), translation_mm=(3.0, -4.0, 6.0)),
                        lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
    template = write_dicom_series(phantom, root / "template", rows=512, cols=512, slices=300, slice_thickness=0.6)
    studies = []
    for n in range(count):
        folder = root / f"study-{n}"
        folder.mkdir()
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for path in template:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            files.append(folder / path.name)
            ds.save_as(files[-1])
        studies.append(files)
    return studies


@contextmanager
def storescp(folder: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """dcmtk storescp on a free port, writing what it receives under `folder`; stopped by PID."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "RESULTS", "-od", str(folder), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_until(lambda: subprocess.run(["echoscu", "-aec", "RESULTS", "127.0.0.1", str(port)],
                                          capture_output=True).returncode == 0, 30, 0.2, "storescp")
        yield port, process
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Run:
    label: str
    studies: int
    seconds: float
    cpu: dict[str, float]
    peaks_mb: dict[str, float]
    delivered: list[datetime]  # each study's last object delivered, in order

    def sustained_per_hour(self) -> float | None:
        """Studies/h between the first and the last but one study delivered."""
        if len(self.delivered) < 3:
            return None
        span = (self.delivered[-2] - self.delivered[0]).total_seconds()
        return (len(self.delivered) - 2) / span * 3600 if span > 0 else None

    def print(self) -> None:
        per_study = {name: seconds / self.studies for name, seconds in self.cpu.items()}
        headscreen = sum(v for k, v in per_study.items() if k not in (SENDER, DESTINATION))
        everything = sum(per_study.values())
        cores = os.cpu_count() or 1
        sustained = self.sustained_per_hour()
        print(f"{self.label}: {self.studies} studies in {self.seconds:.1f} s = "
              f"{self.studies / self.seconds * 3600:,.0f} studies/h"
              + (f" (sustained {sustained:,.0f}/h)" if sustained else "") + f"; CPU-s per study {headscreen:.2f} "
              f"(" + ", ".join(f"{k} {v:.2f}" for k, v in per_study.items()) + "); worker peak RSS "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in self.peaks_mb.items())
              + f"; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        # With the sender and destination on the same cores, this is as fast as it can go.
        print(f"  all processes {everything:.2f} CPU-s per study: at most {cores * 3600 / everything:,.0f} "
              f"studies/h on these {cores} cores at full use; this run left "
              f"{1 - everything * self.studies / (self.seconds * cores):.0%} of its core-seconds unused")


def anchor(study: list[Path], root: Path) -> None:
    """One study into a bare storescp: what receiving alone costs on this machine now."""
    with storescp(root / "anchor") as (port, process):
        started, cpu = time.monotonic(), cpu_seconds(process.pid)
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "RESULTS", "127.0.0.1", str(port), *map(str, study)],
                       check=True, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=600)
        wall = time.monotonic() - started
        print(f"anchor: one 300-slice study into dcmtk storescp in {wall:.1f} s ({300 / wall:.0f} inst/s), "
              f"storescp CPU {cpu_seconds(process.pid) - cpu:.2f} s; load "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def run(studies: list[list[Path]], root: Path, workers: int, database_url: str | None, label: str,
        receiver_processes: int | None = None, test_timing: bool = False) -> Run:
    with ExitStack() as stack:
        port, destination = stack.enter_context(storescp(root / f"pacs-{label}"))
        extra = "" if receiver_processes is None else f"[receiver]\nprocesses = {receiver_processes}\n"
        daemon = Daemon(root / f"hs-{label}", destinations=[("pacs", "RESULTS", port)], workers=workers,
                        database_url=database_url, extra=extra)
        if not test_timing:
            daemon.use_shipped_timing()
        daemon.start()
        stack.callback(daemon.close)
        assert daemon.process is not None
        # Warm: every worker has loaded and warmed its bundles (log line per worker).
        wait_until(lambda: (daemon.workdir / "serve.log").read_text(errors="replace").count("worker started")
                   >= workers, 300, 0.5, "workers warm")
        # Receiver processes start before serve's workers and before it logs them warm.
        receiver_pids = [p for p in children(daemon.process.pid) if is_receiver(p)]
        worker_pids = [p for p in children(daemon.process.pid) if is_worker(p)]
        pids = {"serve": daemon.process.pid, **{f"receiver{i + 1}": p for i, p in enumerate(receiver_pids)},
                **{f"worker{i + 1}": p for i, p in enumerate(worker_pids)}, DESTINATION: destination.pid}
        for pid in worker_pids:
            reset_peak(pid)
        seconds, cpu = send_timed(daemon, studies, pids, 1800, database_server=database_url is not None)
        peaks = {f"worker{i + 1}": peak_rss_mb(p) for i, p in enumerate(worker_pids)}
        return Run(label, len(studies), seconds, cpu, peaks, delivered_in_order(daemon))


def delivered_in_order(daemon: Daemon) -> list[datetime]:
    """When each result's last object was delivered, earliest first."""
    last: dict[int, datetime] = {}
    for delivery, result_object in daemon.deliveries():
        if delivery.delivered_at is not None:
            at = last.get(result_object.result_id)
            last[result_object.result_id] = delivery.delivered_at if at is None else max(at, delivery.delivered_at)
    return sorted(last.values())


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def is_receiver(pid: int) -> bool:
    """One of serve's further receiver processes ([receiver] processes, named by receiver_pool)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith(PROCESS_NAME_PREFIX)
    except OSError:
        return False


def is_worker(pid: int) -> bool:
    """A worker (a multiprocessing spawn child), not a receiver process or a helper such as
    the resource tracker."""
    line = _cmdline(pid)
    return "spawn_main" in line and "resource_tracker" not in line and not is_receiver(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--postgres", metavar="ADMIN_URL", help="also on PostgreSQL (a throw-away database)")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--test-timing", action="store_true",
                        help="the test harness's short waits and polls (sweeps every 0.25 s) instead of the shipped "
                             "defaults (every 1 s), which cost serve more CPU per study")
    parser.add_argument("--receiver-processes", type=int, metavar="N",
                        help="[receiver] processes = N (default: serve's own, \"auto\")")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}; timing: "
          + ("the test harness's (sweeps every 0.25 s)" if args.test_timing else "shipped defaults"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = make_studies(root / "studies", args.studies)
        anchor(studies[0], root)
        for workers in args.workers:
            if not args.no_sqlite:
                run(studies, root, workers, None, f"sqlite-w{workers}", args.receiver_processes,
                    args.test_timing).print()
            if args.postgres:
                with throwaway_postgres(args.postgres, "hs_throughput") as url:
                    run(studies, root, workers, url, f"postgres-w{workers}", args.receiver_processes,
                        args.test_timing).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
