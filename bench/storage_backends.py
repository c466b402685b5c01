"""Storage backends compared: ingest rate and worker read rate, filesystem vs. PostgreSQL.

Builds bench/ingest.py's synthetic 300-slice 512x512 int16 CT study and, for each
storage backend (daemon/blobstore.py), sends it to headscreen's receiver (durable: the
ingest journal, fdatasynced, before each Success) with one association and with four
(dcmtk storescu processes), with the instance rows in a throw-away PostgreSQL database
in every case. Then reads the study back as a worker does (BlobStore.local_paths into a
scratch folder, then every file parsed whole by pydicom) and prints MB/s.

Backends:
  filesystem           files below storage_dir (a worker elsewhere needs a shared mount)
  postgresql           bytes in `stored_blobs`, column STORAGE EXTERNAL (what migration 0008 sets)
  postgresql-pglz      the same with PostgreSQL's default STORAGE EXTENDED (pglz compression)
  postgresql-lz4       STORAGE EXTENDED with COMPRESSION lz4
  postgresql-journal   EXTERNAL, with the ingest journal as well, the receiver before stop 45:
                       each instance journalled and fdatasynced, its row and bytes committed
                       relaxed (not what the receiver runs now; what dropping the journal gained)

    .venv/bin/python bench/storage_backends.py [--slices 300] [--size 512] [--repeats 2]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres] [--backends filesystem,postgresql,...]

Reads run on a warm page cache (the study was just written; no cache is dropped on a
shared machine), for both backends alike. A benchmark, not a test: prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pydicom
from ingest import SCU_AE, build_study, send
from sqlalchemy import select, text
from throwaway_db import throwaway_postgres

from headscreen.daemon import receiver as receiver_module
from headscreen.daemon.blobstore import BlobStore, FilesystemStore, PostgresStore, Scratch
from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.receiver import ReceiverConfig, start_receiver
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import Instance

_COLUMN_SETUP = {
    "filesystem": None,
    "postgresql": None,  # migration 0008: STORAGE EXTERNAL
    "postgresql-pglz": "ALTER TABLE stored_blobs ALTER COLUMN data SET STORAGE EXTENDED, "
                       "ALTER COLUMN data SET COMPRESSION pglz",
    "postgresql-lz4": "ALTER TABLE stored_blobs ALTER COLUMN data SET STORAGE EXTENDED, "
                      "ALTER COLUMN data SET COMPRESSION lz4",
    # The earlier receiver: the bytes journalled too (receiver.uses_ingest_journal).
    "postgresql-journal": None,
}


@dataclass
class Row:
    backend: str
    associations: int
    ingest_s: list[float]
    read_s: list[float]
    stored_mb: float

    @staticmethod
    def rate(count: float, seconds: list[float]) -> tuple[float, float]:
        return count / min(seconds), count / statistics.median(seconds)


@contextmanager
def receiving(backend: str, work: Path, admin_url: str) -> Iterator[tuple[int, BlobStore, object]]:
    """A durable receiver on a fresh PostgreSQL database with `backend`; (port, store, engine)."""
    with throwaway_postgres(admin_url, "hs_storage_bench") as url:
        upgrade(url)
        engine = make_engine(url)
        setup = _COLUMN_SETUP[backend]
        if setup is not None:
            with engine.begin() as connection:
                connection.execute(text(setup))
        sessions = session_factory(engine)
        in_database = backend != "filesystem"
        storage = work / "receiver"
        config = ReceiverConfig(ae_title="HEADSCREEN", storage_dir=storage, bind_address="127.0.0.1", port=0,
                                allowed_callers=[AllowedCaller(SCU_AE)], disk_min_free_mb=0,
                                blobs_in_database=in_database)
        if backend == "postgresql-journal":
            with mock.patch.object(receiver_module, "uses_ingest_journal", lambda config: config.durable):
                receiver = start_receiver(config, sessions)
        else:
            receiver = start_receiver(config, sessions)
        store: BlobStore = (PostgresStore if in_database else FilesystemStore)(storage, sessions)
        try:
            yield receiver.port, store, engine
        finally:
            receiver.shutdown()
            engine.dispose()


def read_back(store: BlobStore, work: Path) -> tuple[float, int]:
    """What a worker on another machine does first: local files of every instance, each
    parsed whole. (seconds, bytes)."""
    with store.sessions() as session:
        keys = list(session.execute(select(Instance.path).order_by(Instance.instance_number)).scalars())
    started = time.perf_counter()
    total = 0
    with Scratch(work / "worker", "bench") as scratch:
        for path in store.local_paths(keys, scratch):
            dataset = pydicom.dcmread(path)
            total += len(dataset.PixelData)
        seconds = time.perf_counter() - started
    return seconds, total


def stored_megabytes(engine: object, backend: str, storage: Path) -> float:
    if backend == "filesystem":
        return sum(p.stat().st_size for p in storage.rglob("*.dcm")) / 1e6
    with engine.connect() as connection:  # type: ignore[attr-defined]
        size = connection.execute(text("SELECT pg_total_relation_size('stored_blobs')")).scalar_one()
    return int(size) / 1e6


def measure(backend: str, paths: list[Path], associations: int, repeats: int, admin_url: str) -> Row:
    row = Row(backend, associations, [], [], 0.0)
    for _ in range(repeats):
        with (tempfile.TemporaryDirectory(prefix="storage-bench-", dir=os.environ.get("BENCH_TMP")) as tmp,
              receiving(backend, Path(tmp), admin_url) as (port, store, engine)):
            row.ingest_s.append(send(paths, port, "HEADSCREEN", associations))
            seconds, _ = read_back(store, Path(tmp))
            row.read_s.append(seconds)
            row.stored_mb = stored_megabytes(engine, backend, Path(tmp) / "receiver")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--backends", default=",".join(_COLUMN_SETUP))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="storage-bench-study-") as study_dir:
        paths = build_study(Path(study_dir), args.slices, args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {len(paths)} slices {args.size}x{args.size} int16, {megabytes:.1f} MB; best and median "
              f"of {args.repeats}; {os.cpu_count()} CPUs; load {_load()}")
        rows = [measure(backend, paths, associations, args.repeats, args.admin_url)
                for associations in (1, 4) for backend in backends]
    print(f"load after: {_load()}")
    print(f"{'backend':<18}{'assocs':>7}{'inst/s':>9}{'median':>9}{'read MB/s':>11}{'median':>9}{'stored MB':>11}")
    for row in rows:
        best, median = Row.rate(len(paths), row.ingest_s)
        read_best, read_median = Row.rate(megabytes, row.read_s)
        print(f"{row.backend:<18}{row.associations:>7}{best:>9.1f}{median:>9.1f}{read_best:>11.1f}"
              f"{read_median:>9.1f}{row.stored_mb:>11.1f}")
    return 0


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
