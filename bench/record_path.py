"""What recording one received instance costs the database path alone (db.api.record_instances).

The receiver records each instance as it is acknowledged (after the ingest journal holds
it, so the commit does not wait for the disk: `durable=False`). bench/ingest.py measures
that inside the whole receive, where the machine's noise drowns a change of a fraction of a
millisecond; this measures the record alone, on SQLite (a file) and on a throw-away
PostgreSQL database, for `--instances` new instances of one known series, from 1 and from
4 threads at once (4 associations of one study), and prints per instance:
- wall milliseconds (threads together: the run's seconds / instances);
- this process's CPU milliseconds (every thread: SQLAlchemy, the driver, our code);
- on PostgreSQL, the server backends' CPU milliseconds (/proc of each backend the run used).

--paths three-trips also runs PostgreSQL's earlier path (look up and lock; insert and
update; commit: three round trips with the study's row lock held across the two waits),
alternated with the current one (one statement per instance, sent with its commit), so
the two are compared in the same minutes.

    .venv/bin/python bench/record_path.py [--instances 2000] [--rounds 2] [--paths one-trip three-trips]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]

A benchmark, not a test: it prints and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import psycopg  # noqa: E402
from proc_cpu import cpu_seconds  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402
from throwaway_db import throwaway_postgres  # noqa: E402

from db_factories import T0, at, record, uid  # noqa: E402
from headscreen.db import api, ingest  # noqa: E402
from headscreen.db.engine import make_engine, session_factory  # noqa: E402
from headscreen.db.migrate import upgrade  # noqa: E402


@contextlib.contextmanager
def three_trips() -> Iterator[None]:
    """PostgreSQL's earlier path: no series counts as known, so the one-trip statement is never used."""
    class _NeverKnown:
        def has_all(self, records: object) -> bool:
            return False

        def add(self, records: object) -> None:
            pass

    known_series = ingest._known_series
    ingest._known_series = lambda session: _NeverKnown()  # type: ignore[assignment,return-value]
    try:
        yield
    finally:
        ingest._known_series = known_series


def backend_pids(sessions: sessionmaker[Session]) -> list[int]:
    """The server processes of the pool's connections (asked on a connection of its own,
    outside the pool, which is left out)."""
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        return []
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as monitor:
        rows = monitor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                               "AND pid <> pg_backend_pid()").fetchall()
    return [int(row[0]) for row in rows]


def run(sessions: sessionmaker[Session], instances: int, threads: int) -> tuple[float, float, float | None]:
    """(wall ms, client CPU ms, server CPU ms or None) per instance, for `instances` new
    instances of one known series recorded one per call from `threads` threads."""
    study, series = uid(), uid()
    with sessions() as session:
        api.record_instance(session, record(study, series, 1, 1.0), now=T0)

    def record_share(first: int) -> None:
        with sessions() as session:
            for n in range(first, instances + 2, threads):
                api.record_instances(session, [record(study, series, n, float(n))], now=at(1), durable=False)

    # Warm: the pool holds a connection per thread before the clocks start.
    workers = [threading.Thread(target=lambda: sessions().close()) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    pids = backend_pids(sessions)
    server_before = sum(cpu_seconds(pid) for pid in pids)
    client_before, started = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=record_share, args=(2 + k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    client = time.process_time() - client_before
    pids = set(pids) | set(backend_pids(sessions))
    server = sum(cpu_seconds(pid) for pid in pids) - server_before if pids else None
    per = 1000.0 / instances
    return wall * per, client * per, (server * per if server is not None else None)


def report(label: str, threads: int, figures: tuple[float, float, float | None]) -> None:
    wall, client, server = figures
    server_text = f"{server:6.3f}" if server is not None else "     -"
    total = client + (server or 0.0)
    print(f"{label:28s} {threads:7d} {wall:8.3f} {client:10.3f} {server_text:>10s} {total:9.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", nargs="+", choices=("one-trip", "three-trips"), default=["one-trip"])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    print(f"{args.instances} instances per run; {os.cpu_count()} CPUs; load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'database / path':28s} {'threads':>7s} {'wall ms':>8s} {'client ms':>10s} {'server ms':>10s} "
          f"{'CPU ms':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'record.sqlite'}"
        upgrade(url)
        engine = make_engine(url)
        try:
            for _ in range(args.rounds):
                for threads in (1, 4):
                    report("sqlite", threads, run(session_factory(engine), args.instances, threads))
        finally:
            engine.dispose()
    with throwaway_postgres(args.admin_url, "hs_record_path") as pg_url:
        upgrade(pg_url)
        engine = make_engine(pg_url)
        try:
            for _ in range(args.rounds):
                for threads in (1, 4):
                    for path in args.paths:
                        with three_trips() if path == "three-trips" else contextlib.nullcontext():
                            report(f"postgresql {path}", threads,
                                   run(session_factory(engine), args.instances, threads))
        finally:
            engine.dispose()
    print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
