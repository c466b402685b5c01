"""Ingest throughput: dcmtk storescu -> dcmtk storescp vs. headscreen's receiver.

Builds a synthetic 300-slice 512x512 int16 CT study, then sends it with one
association and with four concurrent associations (four storescu processes) to
(a) dcmtk storescp writing to a temporary directory, (b) headscreen's receiver
(durable: each instance is in its ingest journal, fdatasynced, before Success; SQLite,
optionally PostgreSQL), optionally (c) Orthanc as a reference PACS.
Prints instances/s, MB/s and the ratio to storescp.

    .venv/bin/python bench/ingest.py [--slices 300] [--size 512] [--repeats 3] [--orthanc]
                                     [--sqlite-normal] [--no-fsync] [--postgres ADMIN_URL]
                                     [--processes N ...] [--send-pdu BYTES]

Each row is the best and the median of --repeats runs, each into a fresh target;
the load average is printed before and after (the machine may be shared). For
headscreen rows, "cpu" is the receiver's CPU time per instance (this process's user
+ system time during the send: the receiver runs in it, storescu in children), a
figure a shared machine disturbs far less than the wall-clock rate; for the storescp
and Orthanc rows, that process's own CPU time (/proc), so the anchors' CPU per
instance stands beside headscreen's. (A PostgreSQL row's database server is not in it.)
``--sqlite-normal`` adds a row with SQLite synchronous=NORMAL: in WAL mode that
survives a crash of the process but NOT a power cut, so it is not what headscreen
runs (it keeps FULL); it only shows what the per-commit fsync costs.

"headscreen xN" rows run N receiver processes on one port ([receiver] processes = N,
daemon/receiver_pool.py); their "cpu" adds the other processes' CPU time (/proc).

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from proc_cpu import cpu_seconds
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import event
from sqlalchemy.engine import Engine
from throwaway_db import throwaway_postgres

from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.receiver import ReceiverConfig, ReceiverStats
from headscreen.daemon.receiver_pool import ReceiverPool, start_receivers
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade

SCU_AE = "BENCHSCU"
UID_ROOT = "1.2.826.0.1.3680043.8.498."
# dcmtk 3.6.7 leaves Nagle on unless told; with it on, every small PDU waits for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# dcmtk's own default, as a PACS runs it unless told otherwise: Nagle's algorithm on.
DCMTK_NAGLE_ENV = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}


@dataclass(frozen=True)
class Figure:
    target: str
    associations: int
    seconds: float
    median_seconds: float
    instances: int
    megabytes: float
    # headscreen only: seconds per handler stage, summed over associations
    stage_seconds: dict[str, float] | None = None
    # headscreen only: database commits of instance rows (group commit shares them)
    row_commits: int | None = None
    # headscreen only: fdatasyncs of the ingest journal (concurrent associations share them)
    journal_syncs: int | None = None
    # headscreen only: the receiver's CPU seconds (user + system) during the best run
    cpu_seconds: float | None = None

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def median_per_second(self) -> float:
        return self.instances / self.median_seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def build_study(out_dir: Path, slices: int, size: int, seed: int = 0) -> list[Path]:
    """A synthetic head-sized CT study: smooth 'anatomy' plus noise, so files are realistic int16."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    uid = lambda: generate_uid(prefix=UID_ROOT, entropy_srcs=[str(rng.random())])  # noqa: E731
    study_uid, series_uid, frame_uid = uid(), uid(), uid()
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    head = np.where(xx ** 2 + (yy * 1.2) ** 2 < 0.8, 40, -1000).astype(np.int16)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(slices):
        pixels = head + noise.integers(-20, 20, size=head.shape, dtype=np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid = uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "BENCH^PHANTOM", "BENCH0001"
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240102", 1, index + 1
        ds.ImagesInAcquisition = slices
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size / 2, -size / 2, index * 1.0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.astype("<i2").tobytes()
        path = out_dir / f"slice_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    """Wait until something listens (an event we cannot subscribe to across processes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def send(paths: list[Path], port: int, called_ae: str, associations: int, send_pdu: int | None = None) -> float:
    """Send with `associations` concurrent storescu processes; seconds until all finished.
    `send_pdu`: the largest PDU storescu sends (dcmtk's own limit, 131072, by default)."""
    chunks = [paths[i::associations] for i in range(associations)]
    pdu = ["--max-send-pdu", str(send_pdu)] if send_pdu else []
    started = time.perf_counter()
    processes = [
        subprocess.Popen(["storescu", "-R", *pdu, "-aet", SCU_AE, "-aec", called_ae, "127.0.0.1", str(port),
                          *map(str, chunk)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for chunk in chunks
    ]
    failures = []
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            failures.append(stderr[-2000:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))
    return elapsed


class _AnchorCpu:
    """An anchor's (storescp's, Orthanc's) CPU time, so its CPU per instance prints beside
    headscreen's: no stages or counters, and not this process's CPU."""

    in_process = False

    def __init__(self, process: subprocess.Popen) -> None:
        self.pid = process.pid

    def child_cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


@contextmanager
def storescp(work: Path, nagle: bool = False) -> Iterator[tuple[int, str, Path, _AnchorCpu]]:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                               env=DCMTK_NAGLE_ENV if nagle else DCMTK_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, "STORESCP", out, _AnchorCpu(process)
    finally:
        process.terminate()
        process.wait(timeout=10)


class _PoolCounters:
    """A receiver pool's counters, and the CPU time of its other processes (not in RUSAGE_SELF)."""

    def __init__(self, pool: ReceiverPool) -> None:
        self.pool = pool

    def snapshot(self) -> dict[str, Any]:
        return self.pool.stats.snapshot()

    def child_cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pool.pids().values())


@contextmanager
def headscreen(work: Path, durable: bool = True, database_url: str | None = None,
               sqlite_synchronous: str | None = None,
               processes: int = 1) -> Iterator[tuple[int, str, Path, ReceiverStats | _PoolCounters | None]]:
    storage = work / "headscreen"
    url = database_url or f"sqlite:///{storage / 'headscreen.db'}"
    storage.mkdir()
    upgrade(url)
    engine = make_engine(url)
    if sqlite_synchronous is not None:
        _override_synchronous(engine, sqlite_synchronous)
    config = ReceiverConfig(ae_title="HEADSCREEN", storage_dir=storage, bind_address="127.0.0.1", port=0,
                            allowed_callers=[AllowedCaller(SCU_AE)], disk_min_free_mb=0, durable=durable)
    receiver = start_receivers(config, session_factory(engine), processes=processes, database_url=url)
    try:
        counters = _PoolCounters(receiver) if isinstance(receiver, ReceiverPool) else receiver.stats
        yield receiver.port, "HEADSCREEN", storage, counters
    finally:
        receiver.shutdown()
        engine.dispose()


def _override_synchronous(engine: Engine, level: str) -> None:
    """Replace the engine's synchronous=FULL (runs after make_engine's connect hook)."""
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA synchronous={level}")

    event.listen(engine, "connect", on_connect)


@contextmanager
def orthanc(work: Path, nagle: bool = False) -> Iterator[tuple[int, str, Path, _AnchorCpu]]:
    port, http = free_port(), free_port()
    root = work / "orthanc"
    root.mkdir()
    config = {"Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
              "StorageCompression": False, "DicomAlwaysAllowStore": True}
    (root / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], env=DCMTK_NAGLE_ENV if nagle else DCMTK_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, "ORTHANC", root / "db", _AnchorCpu(process)
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def _on_postgres(work: Path, admin_url: str,
                 processes: int = 1) -> Iterator[tuple[int, str, Path, ReceiverStats | _PoolCounters | None]]:
    with (throwaway_postgres(admin_url, "hs_bench") as url,
          headscreen(work, database_url=url, processes=processes) as target):
        yield target


def measure(name: str, target: Callable[[Path], object], paths: list[Path], associations: int,
            repeats: int, megabytes: float, send_pdu: int | None = None) -> Figure:
    """Best and median of `repeats` runs, each into a fresh target (fresh storage and database)."""
    times, stages, commits, syncs, cpu = [], [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="ingest-", dir=os.environ.get("BENCH_TMP")) as tmp:
            with target(Path(tmp)) as (port, called_ae, out_dir, stats):  # type: ignore[attr-defined]
                child_cpu = getattr(stats, "child_cpu_seconds", lambda: 0.0)
                in_process = getattr(stats, "in_process", True)
                own_cpu = _process_cpu_seconds if in_process else (lambda: 0.0)
                cpu_before = own_cpu() + child_cpu()
                times.append(send(paths, port, called_ae, associations, send_pdu))
                cpu.append(own_cpu() + child_cpu() - cpu_before)
                stored = sum(1 for p in Path(out_dir).rglob("*") if p.is_file())
                if name != "orthanc" and stored < len(paths):
                    raise RuntimeError(f"{name}: only {stored} of {len(paths)} files stored")
            if stats is not None and in_process:
                snapshot = stats.snapshot()  # after the stop: a pool's processes have sent their last counts
                stages.append(snapshot["stage_seconds"])
                commits.append(snapshot["row_commits"])
                syncs.append(snapshot["journal_syncs"])
    best = min(range(repeats), key=times.__getitem__)
    return Figure(name, associations, times[best], statistics.median(times), len(paths), megabytes,
                  stages[best] if stages else None, commits[best] if commits else None,
                  syncs[best] if syncs else None, cpu[best] if stats is not None else None)


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: not storescu, storescp or Orthanc
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--orthanc", action="store_true", help="add Orthanc as a reference row")
    parser.add_argument("--no-fsync", action="store_true", help="add a headscreen row without fsync")
    parser.add_argument("--sqlite-normal", action="store_true",
                        help="add a headscreen row with SQLite synchronous=NORMAL (not power-loss durable)")
    parser.add_argument("--processes", type=int, nargs="*", default=[2], metavar="N",
                        help="add headscreen rows with [receiver] processes = N (default: 2; none: no such rows)")
    parser.add_argument("--send-pdu", type=int, metavar="BYTES",
                        help="the largest PDU storescu sends (--max-send-pdu, 4096-131072; default: dcmtk's "
                             "131072); many PACS send 16384")
    parser.add_argument("--postgres", metavar="ADMIN_URL",
                        help="add a headscreen row on PostgreSQL (a temporary database is created "
                             "through ADMIN_URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (dcmtk) is not installed")

    with tempfile.TemporaryDirectory(prefix="ingest-study-") as study_dir:
        paths = build_study(Path(study_dir), args.slices, args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {len(paths)} slices {args.size}x{args.size} int16, {megabytes:.1f} MB; "
              f"best and median of {args.repeats}; {os.cpu_count()} CPUs; load {_load()}"
              + (f"; storescu sends PDUs of at most {args.send_pdu} bytes" if args.send_pdu else ""))
        targets: list[tuple[str, Callable[[Path], object]]] = [("storescp", storescp), ("headscreen", headscreen)]
        if args.sqlite_normal:
            targets.append(("hs-sqlite-NORMAL*", lambda work: headscreen(work, sqlite_synchronous="NORMAL")))
        if args.no_fsync:
            targets.append(("headscreen-nofsync", lambda work: headscreen(work, durable=False)))
        for count in args.processes:
            targets.append((f"headscreen x{count}", lambda work, n=count: headscreen(work, processes=n)))
        if args.postgres:
            targets.append(("headscreen-postgres", lambda work: _on_postgres(work, args.postgres)))
            for count in args.processes:
                targets.append((f"hs-postgres x{count}",
                                lambda work, n=count: _on_postgres(work, args.postgres, processes=n)))
        if args.orthanc and shutil.which("Orthanc"):
            targets.append(("orthanc", orthanc))
        figures = [measure(name, target, paths, associations, args.repeats, megabytes, args.send_pdu)
                   for associations in (1, 4) for name, target in targets]

    print(f"load after: {_load()}")
    baseline = {f.associations: f for f in figures if f.target == "storescp"}
    # Issue 14's target is relative to Orthanc (best and median, same run).
    reference = {f.associations: f for f in figures if f.target == "orthanc"}
    print(f"{'target':<20}{'assocs':>7}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}{'x storescp':>12}"
          f"{'median x':>10}{'x orthanc':>11}{'median x':>10}")
    for f in figures:
        ratio = baseline[f.associations].seconds / f.seconds
        median_ratio = baseline[f.associations].median_seconds / f.median_seconds
        orthanc_ratios = ""
        if f.associations in reference:
            anchor = reference[f.associations]
            orthanc_ratios = f"{anchor.seconds / f.seconds:>11.2f}{anchor.median_seconds / f.median_seconds:>10.2f}"
        stages = ""
        if f.cpu_seconds is not None:
            stages = f"  cpu {1000 * f.cpu_seconds / f.instances:.2f} ms/instance;"
        if f.stage_seconds:
            stages += "  ms/instance: " + " ".join(
                f"{stage} {1000 * seconds / f.instances:.1f}" for stage, seconds in f.stage_seconds.items())
        if f.row_commits:
            stages += f"; rows/commit {f.instances / f.row_commits:.1f}"
        if f.journal_syncs:
            stages += f"; instances/journal sync {f.instances / f.journal_syncs:.1f}"
        print(f"{f.target:<20}{f.associations:>7}{f.seconds:>9.2f}{f.per_second:>9.1f}"
              f"{f.mb_per_second:>9.1f}{ratio:>12.2f}{median_ratio:>10.2f}{orthanc_ratios}{stages}")
    if args.sqlite_normal:
        print("* synchronous=NORMAL: durable against a process crash, NOT against power loss; "
              "headscreen runs FULL")
    return 0


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
