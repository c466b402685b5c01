"""/metrics: Prometheus exposition through prometheus_client.

Where each number comes from, and why:
- The database is the one place every process writes to (the receiver and scheduler
  run in `headscreen serve`, workers in their own processes or on other machines, the
  console maybe alone), so what they did is read from it at scrape time by a custom
  Collector: states are gauges; rows that are never deleted or leave a state for good
  (results, finished jobs, delivered objects) are counted as counters; each new
  result is read once into histograms that only grow (durations, scores).
- What only the receiver sees (associations refused before any row is written, time
  per stage) is counted in its process; the console exposes it when it runs in that
  process (`headscreen serve`), through a second Collector over the receiver's counters.
- process_* metrics describe the console's process (prometheus_client's collectors).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from headscreen.daemon.web.context import WebContext
from headscreen.db.models import Delivery, IngestRejection, Instance, Job, Result, Study
from headscreen.db.states import DeliveryState, JobState, StudyState
from headscreen.db.txn import end_read

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
TURNAROUND_BUCKETS = (30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
QUANTILE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

# Timing keys come from result rows: only plain names become label values.
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
_ENDED_JOB_STATES = (JobState.DONE, JobState.FAILED, JobState.SUPERSEDED)
_OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.DEAD)


def _version() -> str:
    try:
        return metadata.version("headscreen")
    except metadata.PackageNotFoundError:
        return "unknown"


class _ResultTail:
    """Reads each result row once, in id order, into histograms that keep what earlier
    scrapes added (cumulative, as Prometheus expects; a restart starts again from all rows).

    Ids are handed out before commit, so on PostgreSQL a row may become visible after
    one with a higher id. Rows of the last SETTLE_S are therefore remembered by id, and
    the cursor passes only rows older than that."""

    SETTLE_S = 600.0
    BATCH = 5000

    def __init__(self) -> None:
        self.cursor = 0  # every row with an id up to this one was read (or never committed)
        self.recent: dict[int, datetime] = {}  # rows above the cursor already read
        self.stage = Histogram("headscreen_pipeline_stage_duration_seconds",
                               "Seconds per pipeline stage of each result (load, select, preprocess, infer ...).",
                               ["stage"], buckets=STAGE_BUCKETS, registry=None)
        self.job = Histogram("headscreen_job_duration_seconds",
                             "Seconds from a job's claim by a worker to its result.",
                             buckets=JOB_BUCKETS, registry=None)
        self.turnaround = Histogram("headscreen_study_turnaround_seconds",
                                    "Seconds from a study's last received instance to its result.",
                                    buckets=TURNAROUND_BUCKETS, registry=None)
        self.score = Histogram("headscreen_result_anomaly_score",
                               "Anomaly scores of results, per model bundle (the bundle's own scale).",
                               ["bundle"], buckets=SCORE_BUCKETS, registry=None)
        self.quantile = Histogram("headscreen_result_reference_quantile",
                                  "Where each result's score falls in its healthy reference (0.95: 95th percentile).",
                                  buckets=QUANTILE_BUCKETS, registry=None)

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.stage, self.job, self.turnaround, self.score, self.quantile)

    def update(self, session: Session, now: datetime) -> None:
        def fetch(after: int) -> list[Any]:
            return list(session.execute(
                select(Result.id, Result.created_at, Result.timings, Result.anomaly_score, Result.percentile,
                       Result.bundle_name, Result.bundle_version, Job.started_at, Study.last_received_at)
                .join(Job, Job.id == Result.job_id).join(Study, Study.id == Result.study_id)
                .where(Result.id > after).order_by(Result.id).limit(self.BATCH)
            ).all())

        self.consume(fetch, now)

    def consume(self, fetch: Callable[[int], list[Any]], now: datetime) -> None:
        """Observe the rows `fetch(after_id)` returns (id order, at most BATCH) that were not seen."""
        boundary = now - timedelta(seconds=self.SETTLE_S)
        after = self.cursor
        while True:
            rows = fetch(after)
            for row in rows:
                after = row.id
                if row.id not in self.recent:
                    self._observe(row)
                    self.recent[row.id] = row.created_at
            settled = [i for i, created in self.recent.items() if created < boundary]
            if settled:
                self.cursor = max(settled)
                self.recent = {i: c for i, c in self.recent.items() if i > self.cursor}
            if len(rows) < self.BATCH:
                return

    def _observe(self, row: Any) -> None:
        for key, seconds in (row.timings or {}).items():
            stage = key[:-2] if key.endswith("_s") else key
            if isinstance(seconds, int | float) and seconds >= 0 and _STAGE_NAME.match(stage):
                self.stage.labels(stage).observe(float(seconds))
        if row.started_at is not None:
            self.job.observe(max(0.0, (row.created_at - row.started_at).total_seconds()))
        if row.last_received_at is not None:
            self.turnaround.observe(max(0.0, (row.created_at - row.last_received_at).total_seconds()))
        if row.anomaly_score is not None:
            self.score.labels(f"{row.bundle_name}-{row.bundle_version}").observe(float(row.anomaly_score))
        if row.percentile is not None:
            self.quantile.observe(float(row.percentile) / 100.0)


class DatabaseCollector(Collector):
    """State and history from the database, queried at scrape time."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()  # concurrent scrapes must not read the tail twice
        self._tail = _ResultTail()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("headscreen_database_up", "1 when the last scrape could read the database.")
        with self._lock:
            try:
                with self.ctx.db() as session:
                    families = list(self._families(session))
                    self._tail.update(session, datetime.now(UTC))
                    end_read(session)
            except Exception as exc:  # a scrape reports the outage instead of failing
                logger.warning("metrics: database unreadable",
                               extra={"action": "metrics_db", "error": type(exc).__name__})
                up.add_metric([], 0)
                yield up
                return
            up.add_metric([], 1)
            yield up
            yield from families
            for histogram in self._tail.histograms():
                for metric in histogram.collect():
                    # No _created series: the buckets count rows from before this process started.
                    metric.samples = [x for x in metric.samples if not x.name.endswith("_created")]
                    yield metric

    def _families(self, session: Session) -> Iterator[Metric]:
        def by_state(model: Any) -> dict[str, int]:
            return {str(s): int(n) for s, n in session.execute(select(model.state, func.count()).group_by(model.state))}

        studies = by_state(Study)
        gauge = GaugeMetricFamily("headscreen_studies", "Studies by state (receiving: waiting for completeness).",
                                  labels=["state"])
        for state in StudyState:
            gauge.add_metric([str(state)], studies.get(str(state), 0))
        yield gauge

        jobs = by_state(Job)
        gauge = GaugeMetricFamily("headscreen_jobs", "Jobs waiting for or held by a worker.", labels=["state"])
        for job_state in _ACTIVE_JOB_STATES:
            gauge.add_metric([str(job_state)], jobs.get(str(job_state), 0))
        yield gauge
        counter = CounterMetricFamily("headscreen_jobs_finished", "Jobs ended: done (a result), failed (attempts "
                                      "used up or not retryable), superseded (the study changed).", labels=["outcome"])
        for job_state in _ENDED_JOB_STATES:
            counter.add_metric([str(job_state)], jobs.get(str(job_state), 0))
        yield counter

        deliveries = by_state(Delivery)
        gauge = GaugeMetricFamily("headscreen_deliveries", "Result objects to send (pending, in_flight) or "
                                  "dead-lettered (dead: see `headscreen resend`).", labels=["state"])
        for delivery_state in _OPEN_DELIVERY_STATES:
            gauge.add_metric([str(delivery_state)], deliveries.get(str(delivery_state), 0))
        yield gauge
        counter = CounterMetricFamily("headscreen_deliveries_delivered", "Result objects a destination accepted.")
        counter.add_metric([], deliveries.get(str(DeliveryState.DELIVERED), 0))
        yield counter

        counter = CounterMetricFamily("headscreen_results", "Results written, by bundle and outcome (positive, "
                                      "negative, unjudged: no screen result, ineligible: not screened).",
                                      labels=["bundle", "outcome"])
        totals: dict[tuple[str, str], int] = {}
        for name, version, eligible, positive, n in session.execute(
                select(Result.bundle_name, Result.bundle_version, Result.eligible, Result.screen_positive, func.count())
                .group_by(Result.bundle_name, Result.bundle_version, Result.eligible, Result.screen_positive)):
            outcome = ("ineligible" if not eligible else "unjudged" if positive is None
                       else "positive" if positive else "negative")
            key = (f"{name}-{version}", outcome)
            totals[key] = totals.get(key, 0) + int(n)
        for key, n in sorted(totals.items()):
            counter.add_metric(list(key), n)
        yield counter

        counter = CounterMetricFamily("headscreen_ingest_rejection_records", "Rows in the ingest rejection log "
                                      "(repeated refusals of one peer are recorded as one row per interval).")
        counter.add_metric([], int(session.execute(select(func.count(IngestRejection.id))).scalar_one()))
        yield counter

        gauge = GaugeMetricFamily("headscreen_instances_stored", "Received instances on disk (not yet purged).")
        gauge.add_metric([], int(session.execute(select(func.count(Instance.id))).scalar_one()))
        yield gauge

        now = datetime.now(UTC)
        oldest = session.execute(select(func.min(Job.available_at))
                                 .where(Job.state == JobState.QUEUED, Job.available_at <= now)).scalar_one_or_none()
        gauge = GaugeMetricFamily("headscreen_queue_oldest_job_age_seconds",
                                  "Seconds the oldest claimable queued job has waited (0: none waits).")
        gauge.add_metric([], max(0.0, (now - _aware(oldest)).total_seconds()) if oldest is not None else 0.0)
        yield gauge


class ServeCollector(Collector):
    """What `headscreen serve` holds in memory: the receiver's counters, worker processes
    and the scheduler's last sweeps (only when the console runs inside serve)."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        runtime = self.ctx.runtime
        if runtime is None:
            return
        stats = runtime.receiver.stats.snapshot()
        counter = CounterMetricFamily("headscreen_receiver_instances_stored",
                                      "Instances the receiver stored and recorded since the process started.")
        counter.add_metric([], stats.get("stored", 0))
        yield counter
        counter = CounterMetricFamily("headscreen_receiver_store_refusals",
                                      "C-STORE requests answered with a failure status, by status.", labels=["status"])
        for status, n in sorted(stats.get("refused", {}).items()):
            counter.add_metric([status], n)
        yield counter
        counter = CounterMetricFamily("headscreen_receiver_connection_events", "Connections or associations refused "
                                      "or closed by the receiver's limits, by event.", labels=["event"])
        for event, n in sorted(stats.get("connections", {}).items()):
            counter.add_metric([event], n)
        yield counter
        counter = CounterMetricFamily("headscreen_receiver_stage_seconds",
                                      "Seconds the receiver spent per stage of storing (summed).", labels=["stage"])
        for stage, seconds in sorted(stats.get("stage_seconds", {}).items()):
            counter.add_metric([stage], seconds)
        yield counter
        # Optional header values a stored instance's row went without, by DICOM keyword (never
        # a value): a sender whose headers break one field shows up here before anyone asks.
        counter = CounterMetricFamily("headscreen_receiver_header_values", "Optional header values left out of "
                                      "(dropped) or cut to fit (truncated) the rows of stored instances, by keyword.",
                                      labels=["outcome", "keyword"])
        for outcome, key in (("dropped", "values_dropped"), ("truncated", "values_truncated")):
            for keyword, n in sorted(stats.get(key, {}).items()):
                counter.add_metric([outcome, keyword], n)
        yield counter

        pool = runtime.workers
        gauge = GaugeMetricFamily("headscreen_worker_processes", "Worker processes of this serve, by state.",
                                  labels=["state"])
        alive = sum(1 for p in list(pool.processes.values()) if p.is_alive())
        gauge.add_metric(["alive"], alive)
        gauge.add_metric(["configured"], pool.count)
        yield gauge

        _, last_ok_at, _ = runtime.sweeps.snapshot()
        gauge = GaugeMetricFamily("headscreen_scheduler_last_sweep_timestamp_seconds",
                                  "Unix time each scheduler sweep last finished without error.", labels=["sweep"])
        for sweep, at in sorted(last_ok_at.items()):
            gauge.add_metric([sweep], at.timestamp())
        yield gauge


class _BuildCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("headscreen_build", "The running headscreen version.")
        info.add_metric([], {"version": _version()})
        yield info


def build_registry(ctx: WebContext) -> CollectorRegistry:
    """One registry per console app (tests build many apps in one process)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_BuildCollector())
    registry.register(DatabaseCollector(ctx))
    registry.register(ServeCollector(ctx))
    return registry


def _aware(value: Any) -> datetime:
    # Aggregates bypass the UTC column type on SQLite and come back naive (or as text).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@router.get("/metrics", summary="Prometheus metrics (text or OpenMetrics, as the Accept header asks)")
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry), media_type=content_type, headers={"Cache-Control": "no-store"})
