"""Deliveries: claim, lease, retry with backoff, dead letter, resend, uniqueness."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import api
from db.models import AuditEvent, Delivery
from db.states import DeliveryState
from db.types import RetryPolicy
from db_factories import at, claimed_job, outcome

NO_JITTER = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, jitter=0.0)


def finished(session: Session, destinations: list[str] | None = None) -> int:
    ticket = claimed_job(session)
    result_id = api.finish_job(session, ticket.job_id, "w1", outcome(), destinations or ["PACS"], now=at(3700))
    assert result_id is not None
    return result_id


def test_claim_marks_in_flight_and_mark_delivered(db_session: Session) -> None:
    result_id = finished(db_session)
    tickets = api.claim_deliveries(db_session, at(3700), 10, 30)
    assert [t.attempt for t in tickets] == [1, 1]
    assert {t.result_id for t in tickets} == {result_id}
    assert tickets[0].path.startswith("results/")
    assert api.claim_deliveries(db_session, at(3701), 10, 30) == []
    assert api.mark_delivered(db_session, tickets[0].delivery_id, 0x0000, at(3702))
    assert not api.mark_delivered(db_session, tickets[0].delivery_id, 0x0000, at(3703))
    states = dict(db_session.execute(select(Delivery.id, Delivery.state)).all())
    assert states == {tickets[0].delivery_id: DeliveryState.DELIVERED, tickets[1].delivery_id: DeliveryState.IN_FLIGHT}


def test_expired_in_flight_lease_is_claimed_again(db_session: Session) -> None:
    finished(db_session)
    first = api.claim_deliveries(db_session, at(3700), 1, 30)
    assert api.claim_deliveries(db_session, at(3729), 5, 30)[0].delivery_id != first[0].delivery_id
    again = api.claim_deliveries(db_session, at(3731), 5, 30)
    assert [(t.delivery_id, t.attempt) for t in again] == [(first[0].delivery_id, 2)]


def test_filters_by_destination_and_result(db_session: Session) -> None:
    result_id = finished(db_session, ["PACS", "ARCHIVE"])
    archive = api.claim_deliveries(db_session, at(3700), 10, 30, destination="ARCHIVE")
    assert len(archive) == 2 and {t.destination for t in archive} == {"ARCHIVE"}
    assert api.claim_deliveries(db_session, at(3700), 10, 30, result_id=result_id + 1) == []
    assert len(api.claim_deliveries(db_session, at(3700), 10, 30, result_id=result_id)) == 2


def test_failure_backs_off_then_goes_dead_and_can_be_resent(db_session: Session) -> None:
    finished(db_session)
    [ticket] = api.claim_deliveries(db_session, at(3700), 1, 30)
    assert api.mark_delivery_failed(db_session, ticket.delivery_id, "refused", 0xA700, NO_JITTER, at(3700)) == (
        DeliveryState.PENDING
    )
    due = lambda now: [t.delivery_id for t in api.claim_deliveries(db_session, now, 10, 30)]  # noqa: E731
    [other] = due(at(3709))  # first backoff: 10 s; only the other object is due
    assert other != ticket.delivery_id
    assert api.mark_delivered(db_session, other, 0, at(3709))
    assert due(at(3710)) == [ticket.delivery_id]
    assert api.mark_delivery_failed(db_session, ticket.delivery_id, "refused", 0xA700, NO_JITTER, at(3710)) == (
        DeliveryState.PENDING
    )
    assert due(at(3729)) == []  # second backoff: 20 s
    assert due(at(3730)) == [ticket.delivery_id]
    assert api.mark_delivery_failed(db_session, ticket.delivery_id, "refused", 0xA700, NO_JITTER, at(3730)) == (
        DeliveryState.DEAD
    )
    assert due(at(99_999)) == []
    dead = db_session.get(Delivery, ticket.delivery_id)
    assert dead is not None and (dead.last_error, dead.last_status, dead.attempts) == ("refused", 0xA700, 3)

    study_uid = api.list_studies(db_session)[0].study_instance_uid
    assert api.resend_dead(db_session, "admin", study_instance_uid=study_uid, now=at(4000)) == 1
    assert api.resend_dead(db_session, "admin", now=at(4000)) == 0
    [resent] = api.claim_deliveries(db_session, at(4000), 10, 30)
    assert (resent.delivery_id, resent.attempt) == (ticket.delivery_id, 1)
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "resend_dead")).scalar_one()
    assert (event.actor, event.detail) == ("admin", {"delivery_ids": [ticket.delivery_id]})


def test_failure_of_a_delivery_not_in_flight_changes_nothing(db_session: Session) -> None:
    finished(db_session)
    [ticket, _] = api.claim_deliveries(db_session, at(3700), 2, 30)
    api.mark_delivered(db_session, ticket.delivery_id, 0, at(3701))
    assert api.mark_delivery_failed(db_session, ticket.delivery_id, "late", None, NO_JITTER, at(3702)) == (
        DeliveryState.DELIVERED
    )


def test_policy_passed_as_status_is_a_type_error(db_session: Session) -> None:
    with pytest.raises(TypeError, match="status"):
        api.mark_delivery_failed(db_session, 1, "x", NO_JITTER)  # type: ignore[arg-type]


def test_one_delivery_per_object_and_destination(db_session: Session) -> None:
    finished(db_session)
    existing = db_session.execute(select(Delivery)).scalars().first()
    assert existing is not None
    db_session.add(
        Delivery(
            result_object_id=existing.result_object_id,
            destination=existing.destination,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=at(0),
        )
    )
    with pytest.raises(IntegrityError):
        db_session.commit()
    db_session.rollback()


def test_concurrent_delivery_claims_do_not_overlap(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        for _ in range(10):
            finished(session, ["PACS", "ARCHIVE"])  # 10 results x 2 objects x 2 destinations
    senders = 4
    barrier = threading.Barrier(senders)

    def sender(_: int) -> list[int]:
        got = []
        with db_sessions() as session:
            barrier.wait()
            while tickets := api.claim_deliveries(session, at(9000), 3, 60):
                got.extend(t.delivery_id for t in tickets)
        return got

    with ThreadPoolExecutor(senders) as pool:
        claimed = [d for batch in pool.map(sender, range(senders)) for d in batch]
    assert len(claimed) == 40 and len(set(claimed)) == 40
