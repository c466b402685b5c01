"""The job queue: claim, lease, heartbeat, expiry, fencing, retries, supersession."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, add_series, at, claimed_job, complete_study, outcome, record, uid
from headscreen.db import api
from headscreen.db.models import AuditEvent, Delivery, Job, Result, ResultObject, Study
from headscreen.db.states import DeliveryState, JobState
from headscreen.db.types import RetryPolicy


def test_claim_takes_the_oldest_available_job_once(db_session: Session) -> None:
    first_uid, _ = complete_study(db_session, now=at(0))
    complete_study(db_session, now=at(10))
    ticket = api.claim_job(db_session, "w1", 60, at(5000))
    assert ticket is not None
    assert (ticket.study_instance_uid, ticket.attempt, ticket.generation) == (first_uid, 1, 1)
    second = api.claim_job(db_session, "w2", 60, at(5000))
    assert second is not None and second.job_id != ticket.job_id
    assert api.claim_job(db_session, "w3", 60, at(5000)) is None
    job = db_session.get(Job, ticket.job_id)
    assert job is not None
    assert (job.state, job.lease_owner, job.lease_expires_at) == (JobState.RUNNING, "w1", at(5060))


def test_job_is_not_claimable_before_it_is_available(db_session: Session) -> None:
    complete_study(db_session)  # completed (and available) at T0 + 3600
    assert api.claim_job(db_session, "w1", 60, at(3599)) is None
    assert api.claim_job(db_session, "w1", 60, at(3600)) is not None


def test_heartbeat_extends_the_lease_and_expiry_requeues(db_session: Session) -> None:
    ticket = claimed_job(db_session, lease_s=60)  # claimed at 3600
    assert api.heartbeat(db_session, ticket.job_id, "w1", 60, at(3650))
    assert api.requeue_expired(db_session, at(3700)) == 0  # lease now ends at 3710
    assert not api.heartbeat(db_session, ticket.job_id, "intruder", 60, at(3700))
    assert api.requeue_expired(db_session, at(3711)) == 1
    job = db_session.get(Job, ticket.job_id)
    assert job is not None
    assert (job.state, job.lease_owner, job.attempts) == (JobState.QUEUED, None, 1)
    assert "lease expired" in (job.last_error or "")
    assert not api.heartbeat(db_session, ticket.job_id, "w1", 60, at(3712))
    again = api.claim_job(db_session, "w2", 60, at(3712))
    assert again is not None and again.job_id == ticket.job_id and again.attempt == 2


def test_expired_lease_fails_the_job_when_attempts_are_exhausted(db_session: Session) -> None:
    ticket = claimed_job(db_session, lease_s=10)
    for n in range(2):  # max_attempts defaults to 3
        assert api.requeue_expired(db_session, at(3611 + n * 20)) == 1
        assert api.claim_job(db_session, "w1", 10, at(3612 + n * 20)) is not None
    assert api.requeue_expired(db_session, at(3700)) == 1
    job = db_session.get(Job, ticket.job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.FAILED, 3)


def test_finish_job_writes_result_objects_and_deliveries(db_session: Session) -> None:
    ticket = claimed_job(db_session)
    result_id = api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["PACS", "ARCHIVE", "PACS"], now=at(3700))
    assert result_id is not None
    job = db_session.get(Job, ticket.job_id)
    assert job is not None and (job.state, job.finished_at) == (JobState.DONE, at(3700))
    result = db_session.get(Result, result_id)
    assert result is not None
    assert (result.anomaly_score, result.percentile, result.screen_positive) == (1.5, 97.0, True)
    assert result.series_verdicts[0]["accepted"] is True and result.qc_metrics == {"brain_volume_ml": 1180.0}
    assert [o.kind for o in api.get_result_objects(db_session, result_id)] == ["sc", "sr"]
    deliveries = db_session.execute(select(Delivery.destination, Delivery.state)).all()
    assert sorted(deliveries) == sorted([(d, DeliveryState.PENDING) for d in ("PACS", "ARCHIVE")] * 2)


def test_finish_job_is_fenced_after_lease_loss(db_session: Session) -> None:
    ticket = claimed_job(db_session, lease_s=30)
    api.requeue_expired(db_session, at(3700))
    thief = api.claim_job(db_session, "w2", 30, at(3701))
    assert thief is not None and thief.job_id == ticket.job_id
    assert api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["PACS"], now=at(3702)) is None
    assert api.fail_job(db_session, ticket.job_id, "w1", "boom", True, now=at(3702)) is None
    assert db_session.execute(select(Result)).first() is None
    assert db_session.execute(select(ResultObject)).first() is None
    assert api.finish_job(db_session, ticket.job_id, "w2", outcome(), ["PACS"], now=at(3703)) is not None


def test_fail_job_retries_with_backoff_then_fails(db_session: Session) -> None:
    ticket = claimed_job(db_session)
    policy = RetryPolicy(max_attempts=2, base_delay_s=10, max_delay_s=100, jitter=0.0)
    state = api.fail_job(db_session, ticket.job_id, "w1", "PACS busy", True, now=at(3700), policy=policy)
    assert state == JobState.QUEUED
    assert api.claim_job(db_session, "w1", 60, at(3709)) is None  # backoff 10 s
    again = api.claim_job(db_session, "w1", 60, at(3710))
    assert again is not None and again.attempt == 2
    state = api.fail_job(db_session, ticket.job_id, "w1", "PACS busy", True, now=at(3720), policy=policy)
    assert state == JobState.FAILED
    job = db_session.get(Job, ticket.job_id)
    assert job is not None and job.last_error == "PACS busy"
    assert db_session.execute(select(AuditEvent.action).where(AuditEvent.action == "job_failed")).scalar_one()


def test_non_retryable_failure_is_final(db_session: Session) -> None:
    ticket = claimed_job(db_session)
    state = api.fail_job(db_session, ticket.job_id, "w1", "not a head", False, now=at(3700))
    assert state == JobState.FAILED
    assert api.claim_job(db_session, "w1", 60, at(10_000)) is None


def test_retry_policy_delay_grows_caps_and_jitters() -> None:
    policy = RetryPolicy(base_delay_s=2, max_delay_s=30, jitter=0.2)
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    assert 1.6 <= delays[0] <= 2.4 and 3.2 <= delays[1] <= 4.8
    assert all(24 <= d <= 36 for d in delays[4:])
    exact = RetryPolicy(base_delay_s=2, max_delay_s=30, jitter=0)
    assert [exact.delay(n) for n in (1, 2, 3, 10)] == [2, 4, 8, 30]


def test_workers_never_claim_the_same_job(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        for n in range(50):
            add_series(session, uid(), 1, now=at(n))
        assert len(api.sweep_completeness(session, at(5000), 300, 30, BUNDLES)) == 50
    claimers = 4
    barrier = threading.Barrier(claimers)

    def claimer(index: int) -> list[int]:
        claimed = []
        with db_sessions() as session:
            barrier.wait()
            while (ticket := api.claim_job(session, f"w{index}", 60, at(6000))) is not None:
                claimed.append(ticket.job_id)
        return claimed

    with ThreadPoolExecutor(claimers) as pool:
        per_worker = list(pool.map(claimer, range(claimers)))
    everything = [job_id for claimed in per_worker for job_id in claimed]
    assert len(everything) == 50 and len(set(everything)) == 50
    with db_sessions() as session:
        attempts = session.execute(select(Job.attempts)).scalars().all()
        assert attempts == [1] * 50


def test_late_arrival_result_supersedes_the_previous(db_session: Session) -> None:
    ticket = claimed_job(db_session)
    first = api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["PACS"], now=at(3700))
    series = db_session.execute(select(Study)).scalar_one().series[0].series_instance_uid
    late = api.record_instance(db_session, record(ticket.study_instance_uid, series, 5, 25.0), now=at(4000))
    assert late.study_reopened
    api.sweep_completeness(db_session, at(5000), 300, 30, BUNDLES)
    second_ticket = api.claim_job(db_session, "w1", 60, at(5001))
    assert second_ticket is not None and second_ticket.generation == 2
    second = api.finish_job(db_session, second_ticket.job_id, "w1", outcome(percentile=50.0), ["PACS"], now=at(5100))
    old, new = db_session.get(Result, first), db_session.get(Result, second)
    assert old is not None and new is not None
    assert (old.superseded, new.superseded, new.supersedes_result_id) == (True, False, first)
    [row] = api.list_studies(db_session)
    assert (row.result_id, row.percentile, row.generation) == (second, 50.0, 2)


def test_running_job_of_a_reopened_study_cannot_finish(db_session: Session) -> None:
    ticket = claimed_job(db_session, lease_s=3600)
    series = db_session.execute(select(Study)).scalar_one().series[0].series_instance_uid
    api.record_instance(db_session, record(ticket.study_instance_uid, series, 5, 25.0), now=at(3700))
    api.sweep_completeness(db_session, at(5000), 300, 30, BUNDLES)
    assert api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["PACS"], now=at(5001)) is None
    assert not api.heartbeat(db_session, ticket.job_id, "w1", 60, at(5001))
