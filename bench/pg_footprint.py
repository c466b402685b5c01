"""What one study costs PostgreSQL: rows, transactions, and table and index bytes per million studies.

1. One real CT study through a real `headscreen serve` (one worker, a throw-away PostgreSQL
   database, a dcmtk storescp as the destination): the rows each table holds afterwards and
   the transactions committed for it (pg_stat_database, read after serve has stopped so
   every backend has flushed its counters, less the idle sweeps' rate measured before), and
   the most connections each process held at once (pg_stat_activity by application_name).
2. The same shape filled `--fill` times through db.api (record_instances, the completeness
   sweep, claim, finish_job with as many result objects as the real result had, deliveries
   claimed and marked delivered): table and index bytes divided by the studies and scaled
   to a million studies (B-tree and heap bytes grow linearly with rows).

    .venv/bin/python bench/pg_footprint.py [--slices 300] [--size 512] [--fill 200]
        [--admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

A benchmark, not a test: it prints and asserts nothing (docs/deployment.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy import text  # noqa: E402
from throughput import storescp  # noqa: E402
from throwaway_db import throwaway_postgres  # noqa: E402
from workers_scaling import make_studies  # noqa: E402

from headscreen.db import api  # noqa: E402
from headscreen.db.engine import make_engine, session_factory  # noqa: E402
from headscreen.db.migrate import upgrade  # noqa: E402
from headscreen.db.models import Base  # noqa: E402
from headscreen.db.types import BundleRef, InstanceRecord, JobOutcome, OutputObject  # noqa: E402
from serve_harness import Daemon, storescu, wait_until  # noqa: E402

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


def table_rows(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {t: connection.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()
                    for t in sorted(Base.metadata.tables)}
    finally:
        engine.dispose()


def commits(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            return connection.execute(text(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")).scalar_one()
    finally:
        engine.dispose()


class ConnectionSampler:
    """The most connections each application_name held at once (pg_stat_activity, every 0.1 s)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.engine.dispose()

    def _run(self) -> None:
        with self.engine.connect() as connection:
            while not self.stop.wait(0.1):
                rows = connection.execute(text(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() GROUP BY 1")).all()
                connection.commit()
                for name, count in rows:
                    self.peak[name or "(none)"] = max(self.peak.get(name or "(none)", 0), count)


def real_study(root: Path, url: str, slices: int, size: int) -> tuple[dict[str, int], int, float]:
    """Rows per table after one study; transactions committed while it went through, and the
    idle rate (the sweeps' own transactions per second, measured before it was sent)."""
    study = make_studies(root / "studies", 1, slices, size)[0]
    with storescp(root / "pacs") as (port, _):
        daemon = Daemon(root / "hs", destinations=[("pacs", "RESULTS", port)], workers=1, database_url=url).start()
        try:
            wait_until(lambda: "worker started" in (daemon.workdir / "serve.log").read_text(errors="replace"),
                       600, 0.5, "worker warm")
            time.sleep(11.0)  # idle backends flush their counters within 10 s (PostgreSQL 15)
            idle_from, idle_started = commits(url), time.monotonic()
            time.sleep(20.0)
            sent_from, started = commits(url), time.monotonic()
            idle_rate = (sent_from - idle_from) / (started - idle_started)
            with ConnectionSampler(url) as sampler:
                storescu(study, daemon.port)
                wait_until(lambda: daemon.all_delivered(1), 900, 0.2, "result delivered")
            daemon.stop()  # every backend exits and flushes its counters
            window = time.monotonic() - started
            time.sleep(1.0)
            sent_to = commits(url)
        finally:
            daemon.close()
    print("connections held at once, at most, while the study went through: "
          + ", ".join(f"{name} {count}" for name, count in sorted(sampler.peak.items())))
    print(f"idle: {idle_rate:.1f} transactions/s (the sweeps every 0.25 s in this configuration); study window "
          f"{window:.0f} s, {sent_to - sent_from} transactions in it")
    return table_rows(url), round(sent_to - sent_from - idle_rate * window), idle_rate


def fill(url: str, count: int, slices: int, objects: int) -> None:
    """`count` studies of `slices` instances, each screened with `objects` result objects and delivered."""
    bundle = BundleRef(name="ct-fanogan-compact", version="2.1.0", modality="CT")
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    now = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    for n in range(count):
        study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
        records = []
        for i in range(slices):
            sop = f"2.25.{uuid.uuid4().int}"
            records.append(InstanceRecord(
                study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop, sop_class_uid=CT_IMAGE,
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"{study}/{series}/{sop}.dcm", size_bytes=526_000,
                modality="CT", series_number=2, series_description="HEAD 0.6 H30s", instance_number=i + 1,
                slice_position=i * 0.6, study_date="20260105", patient_age="054Y", calling_ae="PACS"))
        with sessions() as session:
            api.record_instances(session, records, now=now)
            api.sweep_completeness(session, now + timedelta(hours=1), 60, 5, [bundle])
            ticket = api.claim_job(session, "bench:1:w0", 120, now + timedelta(hours=1))
            assert ticket is not None
            outs = [OutputObject(f"2.25.{uuid.uuid4().int}", SC_IMAGE, "sc", f"results/{study}/{k}.dcm")
                    for k in range(objects)]
            outcome = JobOutcome(eligible=True, ineligible_reason=None, anomaly_score=1.5, percentile=97.0,
                                 screen_positive=True, threshold=1.2, predicted_age=None, chronological_age=54.0,
                                 age_gap=None, qc_reasons=[], qc_metrics={"brain_volume_ml": 1180.0},
                                 selected_series_uid=series,
                                 series_verdicts=[{"series_uid": series, "accepted": True, "reason": "axial head"}],
                                 timings={"inference_s": 0.8}, objects=outs)
            api.finish_job(session, ticket.job_id, "bench:1:w0", outcome, ["pacs"], now + timedelta(hours=1))
            for delivery in api.claim_deliveries(session, now + timedelta(hours=1), objects, 60):
                api.mark_delivered(session, delivery.delivery_id, 0, now + timedelta(hours=1))
        now += timedelta(minutes=1)
        if (n + 1) % 50 == 0:
            print(f"  filled {n + 1} studies", flush=True)
    engine.dispose()


def sizes(url: str) -> list[tuple[str, str, int]]:
    """(table, relation, bytes) for every table (heap + TOAST) and index of the schema."""
    engine = make_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
            rows = connection.execute(text("""
                SELECT t.relname, t.relname, pg_table_size(t.oid) FROM pg_class t
                  JOIN pg_namespace n ON n.oid = t.relnamespace
                 WHERE n.nspname = 'public' AND t.relkind = 'r'
                UNION ALL
                SELECT t.relname, i.relname, pg_relation_size(i.oid) FROM pg_index x
                  JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
                  JOIN pg_namespace n ON n.oid = t.relnamespace
                 WHERE n.nspname = 'public'
                 ORDER BY 1, 2""")).all()
            return [(r[0], r[1], int(r[2])) for r in rows]
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fill", type=int, default=200)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        with throwaway_postgres(args.admin_url, "hs_footprint") as url:
            rows, transactions, _ = real_study(Path(tmp), url, args.slices, args.size)
        written = {t: n for t, n in rows.items() if n and t != "alembic_version"}
        print(f"one {args.slices}-slice CT study through serve: {sum(written.values())} rows in all, "
              f"~{transactions} transactions for it beyond the idle sweeps (receiver, sweep, worker, delivery)")
        for table, n in written.items():
            print(f"  {table:<24} {n:>6}")
        objects = rows.get("result_objects", 0)
        with throwaway_postgres(args.admin_url, "hs_footprint_fill") as url:
            started = time.monotonic()
            fill(url, args.fill, args.slices, objects)
            print(f"filled {args.fill} studies of {args.slices} instances and {objects} result objects "
                  f"in {time.monotonic() - started:.0f} s")
            measured = sizes(url)
    per_million = 1_000_000 / args.fill
    total = sum(b for _, _, b in measured)
    print(f"bytes per million studies (heap+TOAST per table, then each index): {total * per_million / 1e9:,.0f} GB")
    for table, relation, size in measured:
        if size * per_million >= 0.5e9:
            kind = "table" if table == relation else "index"
            print(f"  {kind:<5} {relation:<44} {size * per_million / 1e9:>8,.1f} GB")
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
