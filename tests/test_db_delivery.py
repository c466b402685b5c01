"""Deliveries: claim, lease, retry with backoff, dead letter, resend, uniqueness."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, at, claimed_job, outcome, record, uid
from headscreen.db import api
from headscreen.db.models import AuditEvent, Delivery, ResultObject, Study
from headscreen.db.states import DeliveryState, ObjectKind
from headscreen.db.types import OutputObject, RejectionNote, RetryPolicy

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


# --------------------------------------------------------------------------- IOCM rejection notes

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


def kos_object() -> OutputObject:
    sop = uid()
    return OutputObject(sop, KOS_STORAGE, "kos", f"results/{sop}.dcm")


def superseding(session: Session, first_destinations: list[str], rejection_for: list[str] | None,
                rejects: tuple[int, ...] | None = None) -> tuple[int, int, OutputObject]:
    """A result to `first_destinations`, a late instance, and the result that supersedes it
    (to the same destinations) with a rejection note for `rejection_for` (None: no note).
    Returns (old result id, new result id, the note's object)."""
    ticket = claimed_job(session)
    old = api.finish_job(session, ticket.job_id, "w1", outcome(), first_destinations, now=at(3700))
    assert old is not None
    series = session.execute(select(Study)).scalar_one().series[0].series_instance_uid
    assert api.record_instance(session, record(ticket.study_instance_uid, series, 5, 25.0), now=at(4000)).study_reopened
    api.sweep_completeness(session, at(5000), 300, 30, BUNDLES)
    second = api.claim_job(session, "w1", 60, at(5001))
    assert second is not None
    note = kos_object()
    rejection = None if rejection_for is None else RejectionNote(note, rejects or (old,), tuple(rejection_for))
    new = api.finish_job(session, second.job_id, "w1", outcome(), first_destinations, now=at(5100),
                         rejection=rejection)
    assert new is not None
    return old, new, note


def claimed_kinds(session: Session, now: float, **filters: object) -> list[tuple[str, str, int]]:
    """(destination, kind, result id) of what a claim at `now` takes, sorted; marks nothing delivered."""
    kinds = dict(session.execute(select(ResultObject.sop_instance_uid, ResultObject.kind)).all())
    tickets = api.claim_deliveries(session, at(now), 100, 30, **filters)  # type: ignore[arg-type]
    return sorted((t.destination, str(kinds[t.sop_instance_uid]), t.result_id) for t in tickets)


def deliver_all(session: Session, now: float, **filters: object) -> list[api.DeliveryTicket]:
    tickets = api.claim_deliveries(session, at(now), 100, 30, **filters)  # type: ignore[arg-type]
    for ticket in tickets:
        assert api.mark_delivered(session, ticket.delivery_id, 0, at(now))
    return tickets


def test_a_rejection_note_goes_to_each_destination_after_the_new_result_is_delivered_there(
    db_session: Session,
) -> None:
    # NEW was configured after the old result went out: it never had anything to reject.
    old, new, note = superseding(db_session, ["PACS", "ARCHIVE"], ["PACS", "ARCHIVE", "NEW"])
    row = db_session.execute(select(ResultObject).where(ResultObject.kind == ObjectKind.KOS)).scalar_one()
    assert (row.result_id, row.sop_instance_uid, row.sop_class_uid) == (new, note.sop_instance_uid, KOS_STORAGE)
    assert sorted(db_session.execute(select(Delivery.destination).where(
        Delivery.result_object_id == row.id)).scalars()) == ["ARCHIVE", "PACS"]
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "result_recorded")
                               .order_by(AuditEvent.id.desc())).scalars().first()
    assert event is not None and event.detail["rejection_note"] == note.sop_instance_uid
    assert (event.detail["rejects_result_ids"], event.detail["rejection_destinations"]) == ([old], ["PACS", "ARCHIVE"])

    deliver_all(db_session, 5100, result_id=old)
    # The new SC and SR go first; the note waits for the new result at its destination.
    tickets = api.claim_deliveries(db_session, at(5101), 100, 30)
    assert sorted((t.destination, t.result_id) for t in tickets) == [("ARCHIVE", new)] * 2 + [("PACS", new)] * 2
    assert note.sop_instance_uid not in {t.sop_instance_uid for t in tickets}
    for ticket in tickets:
        if ticket.destination == "PACS":
            assert api.mark_delivered(db_session, ticket.delivery_id, 0, at(5102))
        else:
            api.mark_delivery_failed(db_session, ticket.delivery_id, "refused", 0xA700, NO_JITTER, at(5102))
    # PACS has the new result: its note is due; ARCHIVE's waits for the retry.
    assert claimed_kinds(db_session, 5103, kind=ObjectKind.KOS) == [("PACS", "kos", new)]
    later = deliver_all(db_session, 5120)  # the retry is due (10 s); the PACS note is still leased
    assert {(t.destination, t.sop_instance_uid == note.sop_instance_uid) for t in later} == {("ARCHIVE", False)}
    assert claimed_kinds(db_session, 5121) == [("ARCHIVE", "kos", new)]


def test_a_rejection_note_waits_while_the_rejected_objects_are_still_on_their_way(db_session: Session) -> None:
    old, new, note = superseding(db_session, ["PACS"], ["PACS"])
    deliver_all(db_session, 5100, result_id=new)
    # The old objects never reached the PACS yet: rejecting them first could let them in later.
    assert claimed_kinds(db_session, 5101, kind=ObjectKind.KOS) == []
    [first, second] = api.claim_deliveries(db_session, at(5102), 100, 30, result_id=old)
    assert api.mark_delivered(db_session, first.delivery_id, 0, at(5103))
    assert claimed_kinds(db_session, 5104, kind=ObjectKind.KOS) == []
    policy = RetryPolicy(max_attempts=1)
    assert api.mark_delivery_failed(db_session, second.delivery_id, "refused", 0xA700, policy, at(5105)) == (
        DeliveryState.DEAD)
    # Delivered or dead: settled. The note goes out.
    assert claimed_kinds(db_session, 5106) == [("PACS", "kos", new)]


def test_a_destination_that_does_not_want_rejection_notes_gets_none(db_session: Session) -> None:
    _, new, _ = superseding(db_session, ["PACS", "ARCHIVE"], ["ARCHIVE"])
    deliver_all(db_session, 5100)
    assert claimed_kinds(db_session, 5101) == [("ARCHIVE", "kos", new)]


def test_a_rejection_note_for_other_results_than_the_superseded_is_not_recorded(db_session: Session) -> None:
    old, new, _ = superseding(db_session, ["PACS"], ["PACS"], rejects=(987654,))
    assert db_session.execute(select(ResultObject).where(ResultObject.kind == ObjectKind.KOS)).first() is None
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "result_recorded")
                               .order_by(AuditEvent.id.desc())).scalars().first()
    assert event is not None and event.detail["rejection_note"] is None and event.detail["supersedes_result_id"] == old


def test_current_results_lists_what_a_rejection_note_would_reject(db_session: Session) -> None:
    old, new, note = superseding(db_session, ["PACS", "ARCHIVE"], ["PACS"])
    study_id = db_session.execute(select(Study.id)).scalar_one()
    [current] = api.current_results(db_session, study_id, BUNDLES[0].name)
    assert current.result_id == new and current.destinations == ["ARCHIVE", "PACS"]
    # Its own rejection note is never listed: a later note rejects only its SC and SR.
    assert sorted(o.kind for o in current.objects) == ["sc", "sr"]
    assert note.sop_instance_uid not in {o.sop_instance_uid for o in current.objects}
    assert api.current_results(db_session, study_id, "no-such-bundle") == []
