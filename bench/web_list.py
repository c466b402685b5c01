"""Study-list latency of the admin console with 100,000 studies, on SQLite and PostgreSQL.

Fills a fresh, migrated database by bulk insert (SQLAlchemy core), then times the REST
endpoint /api/v1/studies through the FastAPI app (first page, filtered, sorted, deep
page, review queue) and prints the median of several runs in ms. Target: < 300 ms.

    .venv/bin/python bench/web_list.py [--studies 100000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headscreen.daemon.config import load_settings  # noqa: E402
from headscreen.daemon.web import create_app  # noqa: E402
from headscreen.db import api  # noqa: E402
from headscreen.db.engine import make_engine, session_factory  # noqa: E402
from headscreen.db.migrate import upgrade  # noqa: E402
from headscreen.db.models import Job, Result, Series, Study  # noqa: E402

QUERIES = {
    "first page": "",
    "filtered (CT, positive, pct>=90)": "modality=CT&screen=positive&min_percentile=90",
    "sorted by percentile": "sort=percentile&order=desc",
    "sorted by age gap, MR": "modality=MR&sort=age_gap",
    "station + date range": "station=CT-3&received_from={from_day}&received_to={to_day}",
    "qc reason substring": "qc_reason=registration",
    "deep page (offset 50,000)": "page=1001",
    "review queue": "__review__",
}
# Other console reads, timed once each at the same size (not study-list targets).
OTHER_ENDPOINTS = {"overview page data": "/api/v1/overview", "drift (weekly, 400 days)": "/api/v1/drift?days=400",
                   "metrics": "/metrics",
                   "CSV export (one station, 2 days)":
                       "/api/v1/studies.csv?station=CT-3&received_from={from_day}&received_to={to_day}"}
STATIONS = [f"CT-{i}" for i in range(6)] + [f"MR-{i}" for i in range(4)]
CHUNK = 5000


def fill(url: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    engine = make_engine(url)
    # The newest study arrives now, so the overview and drift windows hold real volumes.
    start = datetime.now(UTC) - timedelta(seconds=(n + 2) * 90)
    studies, series, jobs, results = [], [], [], []
    for i in range(1, n + 1):
        station = rng.choice(STATIONS)
        modality = station[:2]
        received = start + timedelta(seconds=i * 90 + rng.random() * 60)
        studies.append({
            "id": i, "study_instance_uid": f"2.25.{uuid.UUID(int=rng.getrandbits(128)).int}", "modality": modality,
            "state": "complete" if i < n - 20 else "receiving", "generation": 1, "first_received_at": received,
            "last_received_at": received + timedelta(seconds=30), "completed_at": received + timedelta(seconds=90),
            "purged_at": None, "study_date": received.strftime("%Y%m%d"), "patient_age": f"{rng.randint(20, 90):03d}Y",
            "patient_birth_date": None, "station_name": station, "institution": "Bench", "calling_ae": "PACS",
            "flagged": rng.random() < 0.01, "flag_comment": None, "reviewed": rng.random() < 0.5,
            "confirmed_normal": False,
        })
        series.append({"id": i, "study_id": i, "series_instance_uid": f"2.25.{uuid.UUID(int=rng.getrandbits(128)).int}",
                       "modality": modality, "series_number": 2, "series_description": "HEAD", "instance_count": 32})
        jobs.append({"id": i, "study_id": i, "bundle_name": "ct-fanogan" if modality == "CT" else "mr-vae-age",
                     "bundle_version": "1.0.0", "generation": 1, "state": "done", "attempts": 1, "max_attempts": 3,
                     "lease_owner": None, "lease_expires_at": None, "heartbeat_at": None, "created_at": received,
                     "available_at": received, "started_at": received, "finished_at": received + timedelta(minutes=2),
                     "last_error": None})
        if i % 10 != 0:  # one study in ten has no result yet
            pct = rng.random() * 100
            qc = ["registration_failed"] if rng.random() < 0.03 else []
            gap = rng.gauss(0, 6) if modality == "MR" else None
            results.append({
                "id": i, "job_id": i, "study_id": i, "bundle_name": jobs[-1]["bundle_name"], "bundle_version": "1.0.0",
                "eligible": True, "ineligible_reason": None, "anomaly_score": pct / 500, "percentile": pct,
                "screen_positive": pct > 95, "threshold": 0.19, "predicted_age": None, "chronological_age": 55.0,
                "age_gap": gap, "qc_failed": bool(qc), "qc_reasons": qc, "qc_metrics": {"brain_volume_ml": 1200.0},
                "selected_series_uid": series[-1]["series_instance_uid"], "series_verdicts": [],
                "timings": {"inference_s": 0.8}, "created_at": received + timedelta(minutes=2),
                "supersedes_result_id": None, "superseded": False,
            })
    with engine.begin() as connection:
        for model, rows in ((Study, studies), (Series, series), (Job, jobs), (Result, results)):
            for k in range(0, len(rows), CHUNK):
                connection.execute(insert(model), rows[k:k + CHUNK])
        if engine.dialect.name == "postgresql":
            for table in ("studies", "series", "jobs", "results"):
                connection.exec_driver_sql(f"SELECT setval('{table}_id_seq', {n + 1})")
            connection.exec_driver_sql("ANALYZE")
        else:
            connection.exec_driver_sql("ANALYZE")
    engine.dispose()


def time_queries(url: str, storage: Path, runs: int) -> dict[str, tuple[float, float, int]]:
    engine = make_engine(url)
    sessions = session_factory(engine)
    settings = load_settings(None, storage_dir=str(storage), database_url=url, allow_any_caller=True)
    with sessions() as session:
        api.create_user(session, "bench", "bench-password", "viewer", actor="bench")
    client = TestClient(create_app(settings, sessions, []))
    login = client.post("/api/v1/login", json={"username": "bench", "password": "bench-password"})
    assert login.status_code == 200
    out = {}
    for name, query in QUERIES.items():
        today = datetime.now(UTC).date()
        query = query.format(from_day=today - timedelta(days=30), to_day=today - timedelta(days=20))
        path = "/api/v1/review-queue" if query == "__review__" else f"/api/v1/studies?{query}"
        out[name] = _timed(client, path, runs)
    for name, path in OTHER_ENDPOINTS.items():
        today = datetime.now(UTC).date()
        out[name] = _timed(client, path.format(from_day=today - timedelta(days=3), to_day=today - timedelta(days=2)), 2)
    engine.dispose()
    return out


def _timed(client: TestClient, path: str, runs: int) -> tuple[float, float, int]:
    samples = []
    rows = 0
    for _ in range(runs + 1):  # the first run warms caches and is dropped
        started = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/json"):
            body = response.json()
            rows = len(body["studies"]) if isinstance(body, dict) and "studies" in body else len(body)
        else:
            rows = response.text.count("\n")
    return statistics.median(samples[1:]), max(samples[1:]), rows


def _pg_url() -> tuple[str, str]:
    name = f"hs_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _pg_drop(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            pg_name = None
            if backend == "postgresql":
                pg_name, url = _pg_url()
            else:
                url = f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
            try:
                upgrade(url)
                started = time.perf_counter()
                fill(url, args.studies)
                print(f"\n{backend}: {args.studies} studies inserted in {time.perf_counter() - started:.1f} s")
                for name, (median, worst, rows) in time_queries(url, Path(tmp), args.runs).items():
                    flag = "" if median < 300 or name in OTHER_ENDPOINTS else "  <-- over 300 ms"
                    print(f"  {name:<34} median {median:7.1f} ms  max {worst:7.1f} ms  rows {rows:3d}{flag}")
            finally:
                if pg_name:
                    _pg_drop(pg_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
