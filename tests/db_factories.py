"""Builders for db tests: synthetic UIDs, instance records, outcomes, a fixed clock."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from headscreen.db import api
from headscreen.db.types import BundleRef, InstanceRecord, JobOutcome, JobTicket, OutputObject

T0 = datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)
CT_BUNDLE = BundleRef(name="ct-fanogan", version="1.0.0", modality="CT")
MR_BUNDLE = BundleRef(name="mr-vae-age", version="1.0.0", modality="MR")
BUNDLES = [CT_BUNDLE, MR_BUNDLE]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def record(study: str, series: str, number: int | None, position: float | None = None, **kw: object) -> InstanceRecord:
    sop = kw.pop("sop", None) or uid()
    fields: dict[str, object] = {
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": sop,
        "sop_class_uid": CT_IMAGE_STORAGE,
        "transfer_syntax_uid": EXPLICIT_LE,
        "path": f"{study}/{series}/{sop}.dcm",
        "size_bytes": 1000,
        "modality": "CT",
        "series_number": 2,
        "series_description": "HEAD 5mm",
        "instance_number": number,
        "slice_position": position,
        "study_date": "20260105",
        "patient_age": "054Y",
        "calling_ae": "PACS",
    }
    fields.update(kw)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def add_series(
    session: Session,
    study: str,
    count: int,
    now: datetime = T0,
    series: str | None = None,
    spacing: float = 5.0,
    **kw: object,
) -> str:
    """Record a whole, evenly spaced series; returns its UID."""
    series = series or uid()
    for n in range(1, count + 1):
        api.record_instance(session, record(study, series, n, n * spacing, **kw), now=now)
    return series


def complete_study(session: Session, modality: str = "CT", now: datetime = T0, slices: int = 4) -> tuple[str, int]:
    """A received and completed study with its queued job(s); returns (study uid, study id)."""
    study = uid()
    add_series(session, study, slices, now=now, modality=modality)
    done = api.sweep_completeness(session, now + timedelta(seconds=3600), 60, 10, BUNDLES)
    assert len(done) == 1
    return study, done[0]


def claimed_job(session: Session, worker: str = "w1", now: datetime = T0, lease_s: float = 60) -> JobTicket:
    complete_study(session, now=now)
    ticket = api.claim_job(session, worker, lease_s, now + timedelta(seconds=3600))
    assert ticket is not None
    return ticket


def outcome(objects: Sequence[OutputObject] | None = None, **overrides: object) -> JobOutcome:
    fields: dict[str, object] = {
        "eligible": True,
        "ineligible_reason": None,
        "anomaly_score": 1.5,
        "percentile": 97.0,
        "screen_positive": True,
        "threshold": 1.2,
        "predicted_age": None,
        "chronological_age": 54.0,
        "age_gap": None,
        "qc_reasons": [],
        "qc_metrics": {"brain_volume_ml": 1180.0},
        "selected_series_uid": None,
        "series_verdicts": [{"series_uid": "2.25.1", "accepted": True, "reason": "axial head"}],
        "timings": {"inference_s": 0.8},
        "objects": list(objects) if objects is not None else [sc_object(), sr_object()],
    }
    fields.update(overrides)
    return JobOutcome(**fields)  # type: ignore[arg-type]


def sc_object() -> OutputObject:
    sop = uid()
    return OutputObject(sop, SC_STORAGE, "sc", f"results/{sop}.dcm")


def sr_object() -> OutputObject:
    sop = uid()
    return OutputObject(sop, SR_STORAGE, "sr", f"results/{sop}.dcm")


def claim_all_in_process(url: str, worker_id: str, now_s: float, start: object, out: object) -> None:
    """Child-process body for multi-process claim tests: claim until the queue is empty."""
    from headscreen.db.engine import make_engine, session_factory

    engine = make_engine(url)
    sessions = session_factory(engine)
    claimed = []
    start.wait()  # type: ignore[attr-defined]
    with sessions() as session:
        while (ticket := api.claim_job(session, worker_id, 600, at(now_s))) is not None:
            claimed.append(ticket.job_id)
    engine.dispose()
    out.put(claimed)  # type: ignore[attr-defined]


def upgrade_in_process(url: str, start: object, out: object) -> None:
    """Child-process body: migrate the database once the siblings are ready."""
    from headscreen.db.migrate import upgrade

    start.wait()  # type: ignore[attr-defined]
    try:
        upgrade(url)
        out.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the parent test
        out.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def write_once_in_process(url: str, start: object, out: object) -> None:
    """Child-process body: open a (possibly brand new) SQLite file and write once."""
    from sqlalchemy import text

    from headscreen.db.engine import WRITE_TX, make_engine

    try:
        engine = make_engine(url)
        start.wait()  # type: ignore[attr-defined]
        with engine.connect() as connection:
            connection.execution_options(**{WRITE_TX: True})
            with connection.begin():
                connection.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
                connection.execute(text("INSERT INTO t VALUES (1)"))
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        engine.dispose()
        out.put(str(mode))  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the parent test
        out.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
