"""The worker's lease: kept alive while the job runs, never reported lost because the
job ended, reported lost when the job was really taken away."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import daemon.worker
from db import api
from db.models import Job, Result
from db.states import JobState
from db_factories import claimed_job, outcome
from worker_helpers import make_worker, queued_ct_study, worker_settings

HEARTBEATS_WORTH_S = 0.2  # ten heartbeats at heartbeat_s = 0.02
HEARTBEAT_WAIT_S = 30.0  # the most a job waits for its heartbeat thread on a loaded machine


def _wait_for(predicate, what: str) -> None:
    """Poll until `predicate()` holds: ten heartbeats' time is not always ten heartbeats
    on a busy machine (two xdist workers, training), so the job waits for the thread."""
    deadline = time.monotonic() + HEARTBEAT_WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {HEARTBEAT_WAIT_S:.0f} s"
        time.sleep(0.01)


def _renewed(job: Job) -> bool:
    return job.heartbeat_at is not None and job.started_at is not None and job.heartbeat_at > job.started_at


def _lease_lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "lease lost" in r.getMessage()]


def _job(sessions: sessionmaker[Session], study_id: int) -> Job:
    with sessions() as session:
        return session.execute(select(Job).where(Job.study_id == study_id)).scalar_one()


def test_a_normal_job_with_a_slow_delivery_logs_no_lease_lost(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def slow_job(*_args: object, **_kwargs: object):
        time.sleep(HEARTBEATS_WORTH_S)  # heartbeats happen while the job runs
        _wait_for(lambda: _renewed(_job(db_sessions, study_id)), "heartbeat")
        return outcome(objects=[])

    delivered: list[int] = []

    def slow_pacs(_sessions: object, _settings: object, result_id: int) -> None:
        time.sleep(HEARTBEATS_WORTH_S)  # a delivery as long as the job: the old heartbeat was still beating here
        delivered.append(result_id)

    monkeypatch.setattr(daemon.worker, "deliver_due", slow_pacs)
    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, slow_job)
    caplog.set_level(logging.DEBUG)

    assert worker.run_one()

    job = _job(db_sessions, study_id)
    assert job.state == JobState.DONE
    assert job.heartbeat_at is not None and job.started_at is not None and job.heartbeat_at > job.started_at
    assert len(delivered) == 1
    assert _lease_lost_records(caplog) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_failed_job_logs_no_lease_lost(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def broken_job(*_args: object, **_kwargs: object):
        time.sleep(HEARTBEATS_WORTH_S)
        raise RuntimeError("a bug")

    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, broken_job)
    caplog.set_level(logging.DEBUG)
    assert worker.run_one()
    time.sleep(HEARTBEATS_WORTH_S)  # a heartbeat thread left running would renew (and be refused) now

    assert _job(db_sessions, study_id).state == JobState.QUEUED  # retried later
    assert _lease_lost_records(caplog) == []


def test_a_lease_taken_back_mid_job_still_warns_and_discards_the_result(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def job_outlived_by_its_lease(*_args: object, **_kwargs: object):
        # As if this worker had stalled past its lease: the sweep takes the job back, another worker claims it.
        later = api.utcnow() + timedelta(hours=1)
        with db_sessions() as session:
            assert api.requeue_expired(session, later) == 1
            assert api.claim_job(session, "other-worker", 30, later) is not None
        time.sleep(HEARTBEATS_WORTH_S)
        _wait_for(lambda: _lease_lost_records(caplog), "refused heartbeat")  # the next renewal is refused
        return outcome(objects=[])

    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, job_outlived_by_its_lease)
    caplog.set_level(logging.INFO)
    assert worker.run_one()

    lost = _lease_lost_records(caplog)
    assert lost and all(r.levelno == logging.WARNING for r in lost)
    assert any("result discarded" in r.getMessage() for r in caplog.records)
    job = _job(db_sessions, study_id)
    assert (job.state, job.lease_owner) == (JobState.RUNNING, "other-worker")
    with db_sessions() as session:
        assert session.execute(select(Result).where(Result.study_id == study_id)).first() is None


def test_heartbeat_after_its_own_finish_is_refused_quietly(
    db_session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    ticket = claimed_job(db_session, worker="w1")
    assert api.finish_job(db_session, ticket.job_id, "w1", outcome(objects=[]), []) is not None
    caplog.set_level(logging.INFO)
    assert not api.heartbeat(db_session, ticket.job_id, "w1", 60)
    assert _lease_lost_records(caplog) == []
    assert not api.heartbeat(db_session, ticket.job_id, "intruder", 60)  # never held it: a real loss
    assert len(_lease_lost_records(caplog)) == 1
